"""What a GAN learned, as numbers: Frechet distance in a Fashion-MNIST classifier's features, density and coverage,
class coverage, and for a class-conditional G (--cond) how often its samples are of the class asked for.

    python evaluate.py runs/fc_bce/checkpoint.pt [more checkpoints ...]   # any checkpoint of either script
    python evaluate.py --floor               # the same numbers for real images (the floor) and for noise
    python evaluate.py --train-classifier    # retrain fmnist_classifier.pt (deterministic, ~5 min on a CPU)
    python evaluate.py --pretrained pretrained/fc_bce.pt runs/fc_bce/checkpoint.pt  # ship a run's G
    python evaluate.py --steer pretrained/conv-w32_wgan-gp.pt   # steer an unconditional G toward each class

Inception-FID needs weights that cannot be downloaded offline and is a poor fit for 28x28 grayscale, so
the features are the 128-d penultimate layer of a small CNN trained on the 60k Fashion-MNIST training
images ("FID (FMNIST features)"). Its numbers compare with each other, not with published Inception-FIDs.
Per checkpoint: FID against the 10k test images; density and coverage in the same features (Naeem et al.,
arXiv 2002.09797, k = 5: how much of the samples lies where test images are, and how much of the test images
the samples reach); the share of samples per predicted class; classes covered (a class counts when at least
1% of the samples fall in it); KL(class histogram || uniform) (0 is perfectly balanced); and an
Inception-Score-style sharpness exp(E_x KL(p(y|x) || p(y))), from 1 (blurry or all alike) to 10 (sharp and
varied). A run that kept an average of G (--ema) is scored through the average; --raw scores G itself.
A conditional G draws each class in turn, 1,000 of each in 10,000 (the test set's own mix), and is scored
also by class agreement (the share of the samples drawn for class k that the classifier puts in k) and
intra-class FID (class k's samples against class k's test images), per class and overall.
"""
import argparse
import csv
import hashlib
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import gan_conv
import gan_fc

HERE = Path(__file__).resolve().parent
CLASSIFIER = HERE / "fmnist_classifier.pt"
CLASSIFIER_SHA256 = "34d8cecc3d4ff9c06c4dc612e6ea4bb6876fb7a6d0d381be3aecd60a90043291"
CLASSES = gan_fc.CLASS_NAMES  # T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Boot
COVERED = 0.01  # a class is covered when at least this share of the samples is predicted as it
NEIGHBOURS = 5  # k of density and coverage, as Naeem et al. advise
STEER_SMOOTHING = 3.0  # --steer's default (docs/evaluation.md measures it against plain ascent)


class Classifier(nn.Module):
    """A small CNN (~0.47M parameters). features() is the 128-d space the Frechet distance is taken in."""
    def __init__(self):
        super().__init__()

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        self.body = nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2),  # 14x14
                                  *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 7x7
                                  nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def features(self, images):
        # uint8 (N, 1, 28, 28) in [0, 255] -> [-1, 1], as the GANs see their data
        return self.body(images.float() / 127.5 - 1)

    def forward(self, images):
        return self.head(self.features(images))


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_classifier(path=CLASSIFIER, sha256=CLASSIFIER_SHA256):
    """The committed classifier, refused unless its bytes are exactly the ones every user measures with."""
    if not Path(path).exists():
        sys.exit(f"error: {path} not found; train it with: python evaluate.py --train-classifier")
    if file_sha256(path) != sha256:
        sys.exit(f"error: {path} does not match its recorded SHA-256 (corrupted or replaced); restore it "
                 f"with 'git checkout -- {Path(path).name}' or retrain with --train-classifier")
    model = Classifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def train_classifier(data_root, path=CLASSIFIER, epochs=6, seed=0):
    """Deterministic (seeded) training on the 60k training images only; reports test accuracy."""
    torch.manual_seed(seed)
    x, y = gan_fc.load_fashion_mnist(data_root, train=True)
    x_test, y_test = gan_fc.load_fashion_mnist(data_root, train=False)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x))
        for i in range(len(x) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            batch = x[idx]
            flip = torch.rand(len(batch)) < 0.5  # left-right flips: clothes stay clothes
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(3), batch)
            loss = F.cross_entropy(model.head(model.features(batch)), y[idx].long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  test accuracy {acc:.2%}  "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    torch.save(model.state_dict(), path)
    print(f"wrote {path} ({Path(path).stat().st_size / 1e6:.1f} MB), test accuracy {acc:.2%}\n"
          f"set CLASSIFIER_SHA256 in evaluate.py to {file_sha256(path)}")
    return acc


@torch.no_grad()
def predict(model, images, batch=100, device=None):
    """Features (N, 128) and class probabilities (N, 10) of uint8 images, computed on `device` (default: the
    CPU), returned on the CPU. Chunks of 100 stay in a CPU's cache: twice as fast as 1000, the same numbers."""
    device = device or torch.device("cpu")
    model.eval().to(device)
    feats = torch.cat([model.features(chunk.to(device)).cpu() for chunk in images.split(batch)])
    probs = torch.cat([F.softmax(model.head(f.to(device)), 1).cpu() for f in feats.split(batch)])
    model.cpu()
    return feats, probs


def accuracy(model, images, labels):
    return (predict(model, images)[1].argmax(1) == labels).float().mean().item()


def frechet_distance(real_features, fake_features):
    """The Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, arXiv
    1706.08500): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), in float64. Tr((S1 S2)^1/2) is the sum of
    the square roots of the eigenvalues of S1 S2, as torchmetrics computes it."""
    real = real_features.double()
    fake = fake_features.double()
    mean_gap = (real.mean(0) - fake.mean(0)).square().sum()
    cov_real = torch.cov(real.T)
    cov_fake = torch.cov(fake.T)
    root_trace = torch.linalg.eigvals(cov_real @ cov_fake).sqrt().real.sum()
    return (mean_gap + cov_real.trace() + cov_fake.trace() - 2 * root_trace).item()


def class_metrics(probs):
    """Class shares, classes covered, KL(shares || uniform), and the Inception-Score-style sharpness."""
    shares = torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)
    nonzero = shares[shares > 0]
    kl_uniform = (nonzero * (nonzero * 10).log()).sum().item()
    p = probs.double()
    p_y = p.mean(0, keepdim=True)  # xlogy: 0 * log 0 = 0
    sharpness = (torch.special.xlogy(p, p) - torch.special.xlogy(p, p_y)).sum(1).mean().exp().item()
    return {"classes_covered": int((shares >= COVERED).sum()), "kl_to_uniform": kl_uniform,
            "sharpness": sharpness, "shares": shares.tolist()}


def density_coverage(real_features, fake_features, k=NEIGHBOURS, chunk=500):
    """Density and coverage (Naeem et al. 2020, arXiv 2002.09797, eq. 4 and 5). Around each real point, a ball
    whose radius is its distance to its k-th nearest real neighbour. Density: how many balls each sample lies in,
    averaged, over k (about 1 when the samples lie where the real points do; above 1 where they crowd the dense
    parts). Coverage: the share of real points whose ball holds at least one sample (about 1 - 1/2^k = 0.969 for
    two samples of one distribution, k = 5). In chunks of `chunk` rows: 10,000 x 10,000 distances never sit in
    memory at once. Float64, strict '<', as the authors' code."""
    real = real_features.double()
    fake = fake_features.double()
    radii = torch.cat([torch.cdist(part, real).kthvalue(k + 1, dim=1).values  # k + 1: the point itself is 0
                       for part in real.split(chunk)])
    inside = 0
    covered = torch.zeros(len(real), dtype=torch.bool)
    for part in fake.split(chunk):
        within = torch.cdist(part, real) < radii  # (chunk, real): sample i lies in real point j's ball
        inside += within.sum().item()
        covered |= within.any(0)
    return inside / (k * len(fake)), covered.double().mean().item()


def drawn_classes(n):
    """The classes a conditional G is asked for: each class in turn, an equal share (1,000 of 10,000, the test
    set's own mix)."""
    return torch.arange(n) * len(CLASSES) // n


def conditional_metrics(asked, probs, features, test_features, test_labels):
    """Class agreement and intra-class FID, per class and their mean, for samples drawn for the classes asked."""
    agreement = []
    intra_fid = []
    for k in range(len(CLASSES)):
        mine = asked == k
        agreement.append((probs[mine].argmax(1) == k).double().mean().item())
        intra_fid.append(frechet_distance(test_features[test_labels == k], features[mine]))
    overall = (probs.argmax(1) == asked).double().mean().item()
    return {"agreement": overall, "agreement_per_class": agreement,
            "intra_fid": sum(intra_fid) / len(intra_fid), "intra_fid_per_class": intra_fid}


def evaluate_images(model, images, test_features, device=None, asked=None, test_labels=None):
    """Every metric for a set of uint8 images, against the test set's features; with `asked` (the class each image
    was drawn for) and the test labels, the conditional ones too."""
    features, probs = predict(model, images, device=device)
    density, coverage = density_coverage(test_features, features)
    metrics = {"fid": frechet_distance(test_features, features), "density": density, "coverage": coverage,
               **class_metrics(probs)}
    if asked is not None:
        metrics.update(conditional_metrics(asked, probs, features, test_features, test_labels))
    return metrics


def load_generator(checkpoint, device=torch.device("cpu"), raw=False):
    """G of a checkpoint of gan_fc.py or gan_conv.py (a run's, or one in pretrained/), fp32 on device: the run's
    average of G where it kept one (--ema), unless raw."""
    gan_fc.check_listed_sum(checkpoint)  # a pretrained file: the sum SHA256SUMS gives it
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)  # read once; runs no code
    except Exception as e:  # the same words as the scripts' load_checkpoint
        what = "no such file" if isinstance(e, FileNotFoundError) else "damaged, or not written by gan_fc.py or gan_conv.py"
        sys.exit(f"error: cannot read checkpoint {checkpoint}: {what} ({type(e).__name__})")
    module = {"gan_fc": gan_fc, "gan_conv": gan_conv}.get(ckpt.get("script") if isinstance(ckpt, dict) else None)
    if module is None:
        sys.exit(f"error: {checkpoint} is not a checkpoint of gan_fc.py or gan_conv.py")
    args = module.parse_args(["--loss", ckpt["args"]["loss"]])  # a flag newer than the checkpoint: its loss's default
    vars(args).update(ckpt["args"])
    G, _ = module.build_models(args)
    weights = module.generator_weights(ckpt)
    if raw and "G" not in ckpt:
        sys.exit(f"error: {checkpoint} holds only the average of G, not G itself (--raw)")
    if raw:
        weights = ckpt["G"]
    G.load_state_dict(weights)  # fp16 weights (pretrained/) are copied into the fp32 model
    return G.to(device), ckpt


def which_generator(ckpt, raw=False):
    """'average' when the samples come from a run's average of G (--ema), else 'G'."""
    if "G_ema" in ckpt and not raw:
        return "average"
    return "G"


def generate(checkpoint, n, seed, device, raw=False):
    """n uint8 samples from a checkpoint of gan_fc.py or gan_conv.py, G in eval mode, seeded noise; a conditional
    G draws drawn_classes(n)."""
    G, ckpt = load_generator(checkpoint, device, raw)
    z = torch.randn(n, ckpt["args"]["latent_dim"], generator=torch.Generator().manual_seed(seed))
    labels = None
    if ckpt["args"].get("cond"):
        labels = drawn_classes(n).to(device)
    return gan_fc.sample(G, z.to(device), labels), ckpt


def steer(G, classifier, z, target, steps=100, lr=0.05, smoothing=0.0, draws=4, leash=0.0, seed=0, every=10):
    """Controllable generation without retraining: gradient ascent on each noise vector z toward class `target`,
    maximising the classifier's log p(target | G(z)) - leash * ||z - z0||^2 with Adam's steps. Each z stops at the
    first step at which the classifier puts G(z) in the target class, so it moves no further than it must; the
    leash pulls it back toward where it started on the way. smoothing > 0 follows the
    slope of log p averaged over `draws` noisy copies z + smoothing * e, e ~ N(0, I), one more lever than plain
    ascent: a plain step follows the slope at z alone, which can lead to an image that raises p(target) a little
    without becoming the target, and stays there. Returns the final z (each as it was when it stopped), the step
    at which each reached the target (-1: never), and the images of every z every `every` steps (uint8)."""
    G.eval().requires_grad_(False)
    classifier.eval().requires_grad_(False)
    noise = torch.Generator(device=z.device).manual_seed(seed)
    start = z.detach()
    z = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    reached = torch.full((len(z),), -1, device=z.device)
    stopped = start.clone()
    frames = []
    for step in range(steps + 1):
        with torch.no_grad():
            images = G(z)
            hit = (classifier(((images + 1) * 127.5).round().clamp(0, 255)).argmax(1) == target) & (reached < 0)
            stopped[hit] = z[hit]
            reached[hit] = step
            if step % every == 0 or step == steps:
                frames.append(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
        if step == steps or (reached >= 0).all():
            break
        copies = z.unsqueeze(1)
        if smoothing:
            shake = torch.randn(len(z), draws, z.size(1), generator=noise, device=z.device)
            copies = copies + smoothing * shake
        log_p = F.log_softmax(classifier.head(classifier.body(G(copies.flatten(0, 1)))), 1)[:, target]
        distance = (z - start).square().sum()
        optimizer.zero_grad(set_to_none=True)
        (-log_p.sum() / copies.size(1) + leash * distance).backward()
        optimizer.step()
        with torch.no_grad():
            done = reached >= 0
            z[done] = stopped[done]  # a z that reached the target stays where it first did
    final = torch.where((reached >= 0).unsqueeze(1), stopped, z.detach())
    G.requires_grad_(True)
    return final, reached.cpu(), frames


def command_of(script, settings):
    """The command line that trains a run with these settings: the flags that differ from the defaults
    (the architecture's first; --epochs always), never where the run wrote or read."""
    module = {"gan_fc": gan_fc, "gan_conv": gan_conv}[script]
    defaults = vars(module.parse_args(["--loss", settings["loss"]]))  # that loss's defaults
    defaults["loss"] = module.DEFAULTS["loss"]
    first = ["loss", "disc", "width"]
    order = first + [name for name in defaults if name not in first]
    skip = ("out", "resume", "generate", "given", "data_root", "device", "name")
    words = [f"python {script}.py"]
    for name in order:
        if name in skip or name not in settings:
            continue
        value = settings[name]
        if value == defaults[name] and name != "epochs":
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (tuple, list)):
            words.append(flag + "".join(f" {v:g}" for v in value))
        elif isinstance(value, float):
            words.append(f"{flag} {value:g}")
        else:
            words.append(f"{flag} {value}")
    return " ".join(words)


def export_pretrained(checkpoint, path, samples, seed, data_root, device, average_only=False):
    """A run's G as a small file for pretrained/: G and, where the run kept one (--ema), its average G_ema, which
    the scripts and evaluate.py sample from (average_only: G_ema alone, half the size); fp16, with the run's
    settings, epoch and command, and the scores of this very file (fp16 weights loaded into the fp32 model), its
    SHA-256 in SHA256SUMS."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "D" not in ckpt or ckpt.get("script") not in ("gan_fc", "gan_conv"):
        sys.exit(f"error: {checkpoint} is not a training checkpoint of gan_fc.py or gan_conv.py")
    module = {"gan_fc": gan_fc, "gan_conv": gan_conv}[ckpt["script"]]
    settings = {k: v for k, v in ckpt["args"].items() if k not in ("out", "resume", "generate", "given", "class_name")}
    shipped = dict(script=ckpt["script"], args=settings, epoch=ckpt["epoch"], command=command_of(ckpt["script"], settings))
    for name in ("G", "G_ema"):
        if name in ckpt and not (average_only and name == "G" and "G_ema" in ckpt):
            shipped[name] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt[name].items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sums = path.parent / "SHA256SUMS"
    lines = [line for line in (sums.read_text().splitlines() if sums.exists() else [])
             if Path(line.partition("  ")[2]).name != path.name]  # the old sum of this file goes
    sums.write_text("".join(line + "\n" for line in lines))
    test_images, test_labels = gan_fc.load_fashion_mnist(data_root, train=False)
    model = load_classifier()
    test_features = predict(model, test_images, device=device)[0]
    for _ in range(2):  # once to score the file itself, once more with its scores in it
        with module.write_atomically(path) as f:
            torch.save(shipped, f)
        images, _ = generate(path, samples, seed, device)
        asked = drawn_classes(samples) if settings.get("cond") else None
        m = evaluate_images(model, images, test_features, device, asked, test_labels)
        shipped["scores"] = {"fid_fmnist": round(m["fid"], 3), "classes_covered": m["classes_covered"],
                             "kl_to_uniform": round(m["kl_to_uniform"], 4), "sharpness": round(m["sharpness"], 3),
                             "density": round(m["density"], 3), "coverage": round(m["coverage"], 3),
                             "samples": samples, "seed": seed,
                             "command": f"python evaluate.py --samples {samples} --seed {seed} {path}"}
        if asked is not None:
            shipped["scores"]["agreement"] = round(m["agreement"], 4)
            shipped["scores"]["agreement_per_class"] = [round(a, 4) for a in m["agreement_per_class"]]
            shipped["scores"]["intra_fid"] = round(m["intra_fid"], 3)
            shipped["scores"]["intra_fid_per_class"] = [round(f, 3) for f in m["intra_fid_per_class"]]
    with module.write_atomically(path) as f:
        torch.save(shipped, f)
    lines.append(f"{file_sha256(path)}  {path}")
    sums.write_text("".join(line + "\n" for line in sorted(lines, key=lambda line: line.split("  ")[1])))
    report(f"{path} ({shipped['command']}, epoch {shipped['epoch']}, {path.stat().st_size / 1e6:.2f} MB)", m)
    print(f"wrote {path} and its line in {sums}")


def report(name, m):
    shares = " ".join(f"{c} {s:.1%}" for c, s in zip(CLASSES, m["shares"]))
    print(f"{name}\n  FID (FMNIST features) {m['fid']:.2f}   density {m['density']:.3f}   coverage {m['coverage']:.3f}   "
          f"classes covered {m['classes_covered']}/10   KL to uniform {m['kl_to_uniform']:.3f}   "
          f"sharpness {m['sharpness']:.2f}\n  classes: {shares}")
    if "agreement" in m:
        agreement = " ".join(f"{c} {a:.1%}" for c, a in zip(CLASSES, m["agreement_per_class"]))
        intra = " ".join(f"{c} {f:.1f}" for c, f in zip(CLASSES, m["intra_fid_per_class"]))
        print(f"  class agreement {m['agreement']:.1%}: {agreement}\n  intra-class FID, mean {m['intra_fid']:.2f}: {intra}")


RESULT_COLUMNS = (["when", "what", "script", "loss", "epoch", "samples", "generator", "fid_fmnist", "density",
                   "coverage", "classes_covered", "kl_to_uniform", "sharpness", "agreement", "intra_fid"]
                  + [f"share_{c}" for c in CLASSES] + [f"agreement_{c}" for c in CLASSES]
                  + [f"intra_fid_{c}" for c in CLASSES])


def append_results(path, name, m, extra):
    """One row of results.csv; a file written before a column existed is rewritten with it (its cells empty)."""
    path = Path(path)
    if path.exists():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
        if old and list(old[0]) != RESULT_COLUMNS:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, RESULT_COLUMNS, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(old)
    row = dict(zip(["when", "what", "script", "loss", "epoch", "samples", "generator"],
                   [time.strftime("%Y-%m-%d %H:%M"), name, *extra]))
    row.update({"fid_fmnist": f"{m['fid']:.3f}", "density": f"{m['density']:.4f}", "coverage": f"{m['coverage']:.4f}",
                "classes_covered": m["classes_covered"], "kl_to_uniform": f"{m['kl_to_uniform']:.4f}",
                "sharpness": f"{m['sharpness']:.3f}"})
    row.update({f"share_{c}": f"{s:.4f}" for c, s in zip(CLASSES, m["shares"])})
    if "agreement" in m:
        row.update({"agreement": f"{m['agreement']:.4f}", "intra_fid": f"{m['intra_fid']:.3f}"})
        row.update({f"agreement_{c}": f"{a:.4f}" for c, a in zip(CLASSES, m["agreement_per_class"])})
        row.update({f"intra_fid_{c}": f"{v:.3f}" for c, v in zip(CLASSES, m["intra_fid_per_class"])})
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, RESULT_COLUMNS, restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


def steer_every_class(checkpoint, starts, steps, smoothing, leash, seed, device):
    """--steer: `starts` noise vectors steered toward each class in turn; per class, the share that reached it
    within `steps` steps, the median step at which they did, and how far z moved (||z - z0|| / ||z0||)."""
    G, ckpt = load_generator(checkpoint, device)
    if ckpt["args"].get("cond"):
        sys.exit(f"error: {checkpoint} is a conditional G: ask it for a class with --class; --steer is for one that "
                 f"was trained without classes")
    model = load_classifier().to(device)
    z = torch.randn(starts, ckpt["args"]["latent_dim"], generator=torch.Generator().manual_seed(seed)).to(device)
    print(f"{checkpoint}: {starts} noise vectors steered toward each class, at most {steps} steps, smoothing "
          f"{smoothing:g}, leash {leash:g}")
    shares = []
    for target, name in enumerate(CLASSES):
        final, reached, _ = steer(G, model, z, target, steps, smoothing=smoothing, leash=leash, seed=seed)
        done = reached >= 0
        moved = ((final - z).norm(dim=1) / z.norm(dim=1)).cpu()[done]
        shares.append(done.double().mean().item())
        median_step = reached[done].median().item() if done.any() else float("nan")
        median_move = moved.median().item() if done.any() else float("nan")
        print(f"  {name:9} reached by {shares[-1]:6.1%}   median step {median_step:5.0f}   z moved {median_move:.0%} "
              f"of its length (median)")
    print(f"  every class: {min(shares):.1%} to {max(shares):.1%}")
    return shares


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="*", help="checkpoint.pt files of gan_fc.py or gan_conv.py")
    p.add_argument("--samples", type=int, default=10000, help="samples per checkpoint (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' noise (default: 0)")
    p.add_argument("--test-images", type=int, help="compare with the first N of the 10,000 test images "
                   "(a quick look; the FID comes out higher; default: all)")
    p.add_argument("--floor", action="store_true", help="score 10k real training images and uniform noise")
    p.add_argument("--train-classifier", action="store_true", help="retrain fmnist_classifier.pt")
    p.add_argument("--pretrained", metavar="FILE", help="write the one checkpoint's G, fp16, with its scores, to "
                   "FILE (for pretrained/), and its SHA-256 to SHA256SUMS beside it")
    p.add_argument("--steer", metavar="CHECKPOINT", help="steer an unconditional G's noise toward each class with "
                   "the classifier's gradient, and say how often it gets there")
    p.add_argument("--steps", type=int, default=200, help="--steer: steps at most (default: 200)")
    p.add_argument("--starts", type=int, default=64, help="--steer: noise vectors per class (default: 64)")
    p.add_argument("--smoothing", type=float, default=STEER_SMOOTHING,
                   help=f"--steer: follow the slope averaged over noisy copies of z, this far (default: {STEER_SMOOTHING:g}; 0: plain ascent)")
    p.add_argument("--leash", type=float, default=0.0, help="--steer: penalty weight on ||z - z0||^2 (default: 0)")
    p.add_argument("--raw", action="store_true", help="score G itself, not the average a run kept (--ema)")
    p.add_argument("--average-only", action="store_true", help="with --pretrained: ship the average of G alone")
    p.add_argument("--data-root", default="./data", help="(default: ./data)")
    p.add_argument("--results", default="results.csv", help="file the rows are appended to (default: results.csv)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.error = lambda message: sys.exit(f"error: {message}")
    args = p.parse_args(argv)
    if args.samples < 2:
        p.error("--samples must be at least 2")
    if args.test_images is not None and args.test_images < 2:
        p.error("--test-images must be at least 2")
    if args.train_classifier:
        train_classifier(args.data_root)
        return
    device = gan_fc.pick_device(args.device)
    if args.steer:
        if args.steps < 1 or args.starts < 1 or args.smoothing < 0 or args.leash < 0:
            p.error("--steps and --starts must be at least 1, --smoothing and --leash not negative")
        steer_every_class(args.steer, args.starts, args.steps, args.smoothing, args.leash, args.seed, device)
        return
    if not args.floor and not args.checkpoints:
        p.error("name checkpoints to evaluate, or --floor, --steer or --train-classifier")
    if args.pretrained:
        if len(args.checkpoints) != 1:
            p.error("--pretrained FILE takes one checkpoint")
        export_pretrained(args.checkpoints[0], args.pretrained, args.samples, args.seed, args.data_root, device,
                          args.average_only)
        return
    model = load_classifier()
    test_images, test_labels = gan_fc.load_fashion_mnist(args.data_root, train=False)
    test_images = test_images[:args.test_images]
    test_labels = test_labels[:args.test_images]
    test_features = predict(model, test_images, device=device)[0]
    if args.floor:
        train_images, train_labels = gan_fc.load_fashion_mnist(args.data_root, train=True)
        g = torch.Generator().manual_seed(args.seed)
        chosen = torch.randperm(len(train_images), generator=g)[:args.samples]
        real = train_images[chosen]
        noise = torch.randint(0, 256, real.shape, generator=g, dtype=torch.uint8)
        # The real images are scored as a perfect conditional G would be: each one asked for its own class.
        for name, images, asked in ((f"floor: {args.samples} real training images", real, train_labels[chosen]),
                                    (f"noise: {args.samples} uniform-noise images", noise, None)):
            m = evaluate_images(model, images, test_features, device, asked, test_labels)
            report(name, m)
            append_results(args.results, name, m, ["", "", "", args.samples, ""])
    for path in args.checkpoints:
        images, ckpt = generate(path, args.samples, args.seed, device, args.raw)
        asked = drawn_classes(args.samples) if ckpt["args"].get("cond") else None
        m = evaluate_images(model, images, test_features, device, asked, test_labels)
        generator = which_generator(ckpt, args.raw)
        report(f"{path} ({ckpt['script']}, {ckpt['args']['loss']}, epoch {ckpt['epoch']}, {generator})", m)
        append_results(args.results, path, m, [ckpt["script"], ckpt["args"]["loss"], ckpt["epoch"], args.samples,
                                               generator])
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
