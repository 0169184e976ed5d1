"""A fully-connected GAN on Fashion-MNIST: the tutorial's experiment (a), G and D both fully connected.

    python gan_fc.py --loss bce --epochs 50      # --loss bce | lsgan | wgan | wgan-gp

Reads top to bottom like the tutorial: arguments, models (section 2.2), data, one D step and one G step
(section 2.1), the loop, main(). gan_conv.py repeats everything below the models word for word, so
either file can be copied on its own; the only shared module is losses.py (section 4).
"""
import argparse
import csv
import gzip
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.utils import save_image
from tqdm import tqdm

from losses import LOSSES, clip_weights, discriminator_loss, generator_loss, gradient_penalty

SCRIPT = "gan_fc"


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=LOSSES, default="bce", help="GAN loss, tutorial section 4 (default: bce)")
    p.add_argument("--epochs", type=int, default=50, help="passes of the critic over the training set (default: 50)")
    p.add_argument("--batch-size", type=int, help="(default per loss: 128, the tutorial's; wgan 64)")
    p.add_argument("--latent-dim", type=int, default=100, help="size of the noise vector z (default: 100)")
    p.add_argument("--lr", type=float, help="learning rate of G and D (default per loss: bce/lsgan "
                   "2e-4 Adam, wgan 1e-4 RMSprop, wgan-gp 1e-4 Adam)")
    p.add_argument("--betas", type=float, nargs=2, help="Adam betas (default per loss: (0.5, 0.999); "
                   "wgan-gp (0.0, 0.9); wgan uses RMSprop, which has none)")
    p.add_argument("--n-critic", type=int, help="critic steps per G step (default per loss: 1; 5 for WGANs)")
    p.add_argument("--clip", type=float, help="wgan: clip critic weights to [-c, c] (default 0.01)")
    p.add_argument("--gp-weight", type=float, help="wgan-gp: gradient penalty weight lambda (default 10)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: cuda, else mps, else cpu (default: auto)")
    p.add_argument("--data-root", help="where torchvision's FashionMNIST/ folder is (default: ./data, or the "
                   "--resume run's)")
    p.add_argument("--train-images", type=int, default=60000, help="use only the first N training "
                   "images, for quick checks (default: 60000)")
    p.add_argument("--out", help="output folder (default runs/<architecture>_<loss>, or the folder "
                   "of the --resume checkpoint)")
    p.add_argument("--sample-every", type=int, default=5, help="epochs between sample grids (default: 5)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (faster on recent GPUs/CPUs)")
    p.add_argument("--resume", metavar="PATH", help="continue training from this checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="with --resume: train nothing, write N "
                   "samples to generated.png and generated.pt")
    return p


def parse_args(argv=None):
    """Parse flags, check them and fill the per-loss defaults. Bad input exits with one line."""
    parser = build_parser()
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    args = parser.parse_args(argv)
    # Per-loss defaults from each paper's own algorithm: BCE/LSGAN as the tutorial (DCGAN's Adam
    # settings, arXiv 1511.06434); WGAN Algorithm 1 (arXiv 1701.07875); WGAN-GP Algorithm 1 (1704.00028).
    # WGAN departs in one number, lr 1e-4 (Algorithm 1: 5e-5, batch m = 64): 50 epochs are ~9k G steps,
    # the paper ran 100k+, and at 5e-5 the FC G was one blob after 10 epochs (README, "Every loss").
    defaults = {"bce": (2e-4, (0.5, 0.999), 1, 128), "lsgan": (2e-4, (0.5, 0.999), 1, 128),
                "wgan": (1e-4, None, 5, 64), "wgan-gp": (1e-4, (0.0, 0.9), 5, 128)}
    lr, betas, n_critic, batch_size = defaults[args.loss]
    if args.loss == "wgan" and args.betas is not None:
        parser.error("--betas is for Adam; --loss wgan trains with RMSprop (WGAN paper, section 3)")
    args.lr = lr if args.lr is None else args.lr
    args.betas = betas if args.betas is None else tuple(args.betas)
    args.n_critic = n_critic if args.n_critic is None else args.n_critic
    args.batch_size = batch_size if args.batch_size is None else args.batch_size
    args.clip = 0.01 if args.clip is None else args.clip
    args.gp_weight = 10.0 if args.gp_weight is None else args.gp_weight
    for name in ("epochs", "batch_size", "latent_dim", "n_critic", "sample_every", "train_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.clip <= 0 or args.gp_weight < 0:
        parser.error("--lr and --clip must be positive and --gp-weight not negative")
    if args.generate is not None and (args.generate < 1 or not args.resume):
        parser.error("--generate N needs N >= 1 and --resume CHECKPOINT")
    return args


# ----------------------------------------------------------------------------------------------------
# Models (tutorial 2.2): G maps z to a 1x28x28 image in [-1, 1]; D maps an image to one raw score.
# ----------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    def __init__(self, latent_dim=100):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.ReLU(),
            nn.Linear(256, 512), nn.ReLU(),
            nn.Linear(512, 1024), nn.ReLU(),
            nn.Linear(1024, 28 * 28), nn.Tanh())  # pixels in [-1, 1], like the normalised data

    def forward(self, z):
        return self.net(z).view(-1, 1, 28, 28)


class Discriminator(nn.Module):
    # No final Sigmoid: D returns a logit, and losses.py applies the sigmoid inside the BCE where needed
    # (stable, and allowed under autocast); LSGAN and WGAN want the raw score anyway (tutorial 4.3, 4.4).
    def __init__(self, dropout=0.3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(28 * 28, 1024), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(1024, 512), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.LeakyReLU(0.2),
            nn.Linear(256, 1))

    def forward(self, x):
        return self.net(x.flatten(1))


def build_models(args):
    # A WGAN critic must be one fixed function (its Lipschitz constant is what clipping or the penalty
    # controls), so it gets no Dropout; BCE and LSGAN keep the tutorial's Dropout(0.3).
    dropout = 0.0 if args.loss in ("wgan", "wgan-gp") else 0.3
    return Generator(args.latent_dim), Discriminator(dropout)


def default_run_name(args):
    return f"fc_{args.loss}"


# ----------------------------------------------------------------------------------------------------
# Data: the whole training set as one uint8 tensor on the device; no DataLoader, no per-image transforms.
# ----------------------------------------------------------------------------------------------------
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist


def load_fashion_mnist(root, train=True, debian_dir=DEBIAN_DIR):
    """Images (N, 1, 28, 28) uint8 and labels (N,): from root, else Debian's package, else a download."""
    from torchvision.datasets import FashionMNIST
    raw = Path(root) / "FashionMNIST" / "raw"
    names = [f"{s}-{k}-idx{d}-ubyte" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    if not all((raw / n).exists() for n in names) and all(Path(debian_dir, n + ".gz").exists() for n in names):
        raw.mkdir(parents=True, exist_ok=True)  # torchvision reads the uncompressed files from raw/
        for n in names:
            with gzip.open(Path(debian_dir, n + ".gz")) as src, open(raw / (n + ".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(raw / (n + ".part"), raw / n)
    try:
        ds = FashionMNIST(root, train=train, download=not all((raw / n).exists() for n in names))
    except Exception as e:  # offline, or a damaged file
        sys.exit(f"error: cannot load Fashion-MNIST from {raw} ({type(e).__name__}: {e}); offline, run "
                 f"'sudo apt-get install dataset-fashion-mnist' or put the four *-ubyte files in {raw}/")
    return ds.data.unsqueeze(1), ds.targets


def to_unit_range(images):
    # uint8 [0, 255] -> float [-1, 1]: the tutorial's ToTensor() + Normalize((0.5,), (0.5,)), per batch.
    return images.float().div_(127.5).sub_(1)


# ----------------------------------------------------------------------------------------------------
# One D step and one G step (tutorial 2.1)
# ----------------------------------------------------------------------------------------------------
def d_step(D, opt_d, real, fake, loss, gp_weight=10.0, clip=0.01, amp=False):
    """One update of D (the critic for WGANs). Returns (loss, mean(real) - mean(fake) scores)."""
    fake = fake.detach()  # D's step must not reach G: the fakes are constants here (tutorial 2.1)
    with torch.autocast(real.device.type, torch.bfloat16, enabled=amp):
        real_scores, fake_scores = D(real), D(fake)
        d_loss = discriminator_loss(loss, real_scores, fake_scores)
    if loss == "wgan-gp":  # WGAN-GP, arXiv 1704.00028, Algorithm 1, line 7
        d_loss = d_loss + gp_weight * gradient_penalty(D, real, fake)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    if loss == "wgan":  # WGAN, arXiv 1701.07875, Algorithm 1, line 7
        clip_weights(D, clip)
    return d_loss.detach(), (real_scores.float().mean() - fake_scores.float().mean()).detach()


def g_step(D, opt_g, fake, loss, amp=False):
    """One update of G through D's graph. D's weights get no gradient (the tutorial computes and drops them)."""
    D.requires_grad_(False)
    with torch.autocast(fake.device.type, torch.bfloat16, enabled=amp):
        g_loss = generator_loss(loss, D(fake))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    D.requires_grad_(True)
    return g_loss.detach()


def make_optimizers(G, D, args, device):
    if args.loss == "wgan":  # WGAN, section 3: momentum-based optimizers made the critic unstable
        return (torch.optim.RMSprop(G.parameters(), lr=args.lr), torch.optim.RMSprop(D.parameters(), lr=args.lr))
    fused = device.type in ("cuda", "cpu")  # one pass over all parameters, not one op per tensor
    return (torch.optim.Adam(G.parameters(), lr=args.lr, betas=args.betas, fused=fused),
            torch.optim.Adam(D.parameters(), lr=args.lr, betas=args.betas, fused=fused))


# ----------------------------------------------------------------------------------------------------
# The loop's outputs: sample grids, metrics.csv, losses.png, checkpoint.pt
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(G, z, batch=1000):
    """G's images for noise z as uint8 (N, 1, 28, 28), G in eval mode (BatchNorm uses running stats)."""
    was_training = G.training
    G.eval()
    x = torch.cat([G(chunk).float() for chunk in z.split(batch)])
    G.train(was_training)
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def save_grid(images, path):
    save_image(images.float() / 255, path, nrow=math.ceil(math.sqrt(len(images))), padding=2)


def write_metrics(history, out, loss):
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    import matplotlib
    matplotlib.use("Agg")  # write a file, never open a window (the tutorial's plt.show() blocks)
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    wgan = loss in ("wgan", "wgan-gp")
    fig, axes = plt.subplots(1, 2 if wgan else 1, figsize=(10 if wgan else 5.5, 3.8), squeeze=False)
    axes[0, 0].plot(epochs, [row["d_loss"] for row in history], "o-", ms=3, label="D loss")
    axes[0, 0].plot(epochs, [row["g_loss"] for row in history], "o-", ms=3, label="G loss")
    axes[0, 0].set(xlabel="epoch", ylabel="mean loss over the epoch", title=f"{loss} losses")
    axes[0, 0].legend()
    if wgan:  # the critic's Wasserstein estimate should fall as G improves (WGAN paper, section 4.2)
        axes[0, 1].plot(epochs, [row["wasserstein_estimate"] for row in history], "o-", ms=3, color="C2")
        axes[0, 1].set(xlabel="epoch", ylabel="mean D(real) - mean D(fake)", title="critic's W estimate")
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=100)
    plt.close(fig)


def save_checkpoint(path, **state):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path, script):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values: runs no code
    except Exception as e:  # missing, truncated, or not tensors-only (weights_only refuses pickled code)
        what = "no such file" if isinstance(e, FileNotFoundError) else f"damaged, or not written by {script}.py"
        sys.exit(f"error: cannot read checkpoint {path}: {what} ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        sys.exit(f"error: {path} is not a checkpoint of {script}.py")
    return ckpt


def stop_if_not_finite(d, g, epoch, out):
    if not (math.isfinite(d) and math.isfinite(g)):
        last = f"the last good checkpoint is {out / 'checkpoint.pt'}" if (out / "checkpoint.pt").exists() else "no checkpoint was written"
        sys.exit(f"error: the loss became {d if not math.isfinite(d) else g} in epoch {epoch}, so training stopped; "
                 f"{last}. Try a lower --lr.")


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {name} is not available on this machine; use --device cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------
# main(): set up, then the loop
# ----------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, SCRIPT)
        # Continue with the run's own settings; only these may change on resume.
        given = {k: getattr(args, k) for k in ("epochs", "device", "data_root", "out", "sample_every",
                                               "amp", "resume", "generate")}
        vars(args).update(ckpt["args"])
        vars(args).update({k: v for k, v in given.items() if v is not None})
        args.betas = tuple(args.betas) if args.betas else None
        args.out = given["out"] or str(Path(args.resume).parent)
    args.data_root = args.data_root or "./data"
    args.out = args.out or f"runs/{default_run_name(args)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    G, D = (m.to(device) for m in build_models(args))
    if ckpt:
        G.load_state_dict(ckpt["G"])
        D.load_state_dict(ckpt["D"])
    if args.generate:  # --generate N --resume PATH: samples from the checkpoint's G, no training
        images = sample(G, torch.randn(args.generate, args.latent_dim, device=device))
        torch.save(images, out / "generated.pt")
        save_grid(images, out / "generated.png")
        print(f"wrote {args.generate} samples to {out / 'generated.pt'} and generated.png")
        return
    opt_g, opt_d = make_optimizers(G, D, args, device)
    start, step, history = 0, 0, []
    if ckpt:
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        start, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        if start >= args.epochs:
            sys.exit(f"error: {args.resume} has already trained {start} epochs; ask for more with --epochs")

    data = load_fashion_mnist(args.data_root)[0][:args.train_images].to(device)
    # The same noise every time (its own seeded generator), so grids from different epochs compare.
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    B = args.batch_size
    steps_per_epoch = len(data) // B  # full batches; a different remainder is left out each epoch
    if steps_per_epoch == 0:
        sys.exit(f"error: --batch-size {B} is larger than the {len(data)} training images")
    print(f"{SCRIPT}: {args.loss} on {device}, {len(data)} images, G {sum(p.numel() for p in G.parameters()):,} / "
          f"D {sum(p.numel() for p in D.parameters()):,} parameters, writing to {out}")

    for epoch in range(start + 1, args.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(data), device=device)
        sums = torch.zeros(3, device=device)  # D loss, W estimate, G loss, summed on the device (no sync)
        g_steps = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=None)
        for i in bar:
            real = to_unit_range(data[perm[i * B:(i + 1) * B]])
            z = torch.randn(B, args.latent_dim, device=device)
            g_turn = (step + 1) % args.n_critic == 0  # G steps once every n_critic critic steps
            # One G forward serves both steps: D sees it detached, and G's step reuses it with its graph.
            with torch.set_grad_enabled(g_turn), torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                fake = G(z)
            d_loss, w_est = d_step(D, opt_d, real, fake, args.loss, args.gp_weight, args.clip, args.amp)
            sums[:2] += torch.stack([d_loss, w_est])
            if g_turn:
                sums[2] += g_step(D, opt_g, fake, args.loss, args.amp)
                g_steps += 1
            step += 1
            if i % 50 == 49:  # a device sync, so only now and then
                d, _, g = (sums / torch.tensor([i + 1, i + 1, max(g_steps, 1)], device=device)).tolist()
                bar.set_postfix(D=f"{d:.3f}", G=f"{g:.3f}")
                stop_if_not_finite(d, g, epoch, out)
        seconds = time.perf_counter() - t0
        d, w, g = (sums / torch.tensor([steps_per_epoch, steps_per_epoch, max(g_steps, 1)], device=device)).tolist()
        stop_if_not_finite(d, g, epoch, out)
        history.append({"epoch": epoch, "d_loss": round(d, 5), "g_loss": round(g, 5),
                        "wasserstein_estimate": round(w, 5) if args.loss in ("wgan", "wgan-gp") else "",
                        "seconds": round(seconds, 2), "images_per_sec": round(steps_per_epoch * B / seconds, 1)})
        if epoch % args.sample_every == 0 or epoch == args.epochs:
            save_grid(sample(G, fixed_z), out / f"samples_epoch{epoch:03d}.png")
        write_metrics(history, out, args.loss)
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
        save_checkpoint(out / "checkpoint.pt", script=SCRIPT, epoch=epoch, step=step, args=vars(args),
                        G=G.state_dict(), D=D.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                        rng=rng, history=history)
        w_text = f"  W {w:.4f}" if args.loss in ("wgan", "wgan-gp") else ""
        print(f"epoch {epoch}/{args.epochs}  D {d:.4f}  G {g:.4f}{w_text}  {seconds:.1f} s  "
              f"{steps_per_epoch * B / seconds:.0f} img/s", flush=True)
    print(f"done: samples, metrics.csv, losses.png and checkpoint.pt in {out}")


if __name__ == "__main__":
    main()
