"""A DCGAN on Fashion-MNIST: the tutorial's experiment (c), G and D both convolutional; (b) with --disc fc.

    python gan_conv.py --loss wgan-gp --epochs 50     # --loss bce | lsgan | wgan | wgan-gp; --disc fc: (b)

Reads top to bottom like the tutorial: arguments, models (2.2), data, one D and one G step (2.1), the loop, main().
Below the models, gan_fc.py is the same word for word; the only module they share is losses.py (section 4).
"""
import argparse, gzip, math, os, signal, sys, time  # noqa: E401 (the standard library, on one line)
from pathlib import Path

import torch
import torch.nn as nn
from filelock import FileLock, Timeout  # installed with PyTorch
from torchvision.utils import save_image
from tqdm import tqdm

from losses import LOSSES, clip_weights, discriminator_loss, generator_loss, gradient_penalty

SCRIPT = "gan_conv"


# -- Arguments ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    """Parse flags, check them and fill the per-loss defaults. Bad input exits with one line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=LOSSES, default="bce", help="GAN loss, tutorial section 4 (default: bce)")
    p.add_argument("--epochs", type=int, default=50, help="passes of the critic over the training set (default: 50)")
    p.add_argument("--batch-size", type=int, help="(default per loss: 128, the tutorial's; wgan 64)")
    p.add_argument("--latent-dim", type=int, default=128, help="size of the noise vector z (default: 128)")
    p.add_argument("--disc", choices=("conv", "fc"), default="conv", help="(c) conv, or (b) fc: gan_fc.py's D")
    p.add_argument("--width", type=int, default=128, help="channels w..8w (default: 128; 32 is ~10x faster)")
    p.add_argument("--lr", type=float, help="(default per loss: bce, lsgan, wgan-gp 2e-4; wgan 1e-4)")
    p.add_argument("--betas", type=float, nargs=2, help="Adam's (default per loss: 0.5 0.999; wgan-gp 0.0 0.9)")
    p.add_argument("--n-critic", type=int, help="critic steps per G step (default per loss: 1; wgan 5)")
    p.add_argument("--clip", type=float, help="wgan: clip critic weights to [-c, c] (default 0.01)")
    p.add_argument("--gp-weight", type=float, help="wgan-gp: gradient penalty weight lambda (default 10)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: cuda, mps or cpu")
    p.add_argument("--data-root", help="where the FashionMNIST/ folder is (default: ./data, or the --resume run's)")
    p.add_argument("--train-images", type=int, default=60000, help="use only the first N, for quick checks")
    p.add_argument("--out", help="output folder (default: the first free one of runs/<name>, runs/<name>-2, ...)")
    p.add_argument("--sample-every", type=int, default=5, help="epochs between sample grids (default: 5)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (faster on recent GPUs/CPUs)")
    p.add_argument("--resume", metavar="PATH", help="continue training from this checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="with --resume: write N samples and a latent walk")
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    args = p.parse_args(argv)
    # Per-loss defaults, each paper's algorithm: BCE/LSGAN the tutorial's (DCGAN, 1511.06434); WGAN Alg. 1 (1701.07875) at
    # lr 1e-4, not 5e-5; WGAN-GP Alg. 1 (1704.00028) but 1 critic step at lr 2e-4, not 5 at 1e-4: FID 95, not 304 (README).
    defaults = {"bce": (2e-4, (0.5, 0.999), 1, 128), "lsgan": (2e-4, (0.5, 0.999), 1, 128),  # lr, betas, n_critic,
                "wgan": (1e-4, None, 5, 64), "wgan-gp": (2e-4, (0.0, 0.9), 1, 128)}  # batch size; then clip, gp weight
    if args.loss == "wgan" and args.betas is not None:
        p.error("--betas is for Adam; --loss wgan trains with RMSprop (WGAN paper, section 3)")
    for name, value in zip("lr betas n_critic batch_size clip gp_weight".split(), (*defaults[args.loss], 0.01, 10.0)):
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    args.betas = tuple(args.betas) if args.betas else None
    for name in ("epochs", "batch_size", "latent_dim", "n_critic", "sample_every", "train_images", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.clip <= 0 or args.gp_weight < 0:
        p.error("--lr and --clip must be positive and --gp-weight not negative")
    if args.generate is not None and (args.generate < 1 or not args.resume):
        p.error("--generate N needs N >= 1 and --resume CHECKPOINT")
    args.name = f"{'conv' if args.disc == 'conv' else 'convG-fcD'}{f'-w{args.width}' * (args.width != 128)}_{args.loss}"
    return args


# -- Models (tutorial 2.2): G maps z to a 1x28x28 image in [-1, 1]; D maps an image to one raw score.
class Generator(nn.Module):
    # DCGAN generator, no biases (BatchNorm follows). Real sizes 3/6/13/28; the tutorial's comments say 4/8/14/28.
    def __init__(self, latent_dim=128, w=128):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 8 * w, 3, 1, 0, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU(),  # 3x3
            nn.ConvTranspose2d(8 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),  # 6x6
            nn.ConvTranspose2d(4 * w, 2 * w, 5, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),  # 13x13
            nn.ConvTranspose2d(2 * w, 1, 6, 2, 1, bias=False), nn.Tanh())  # 28x28, pixels in [-1, 1]

    def forward(self, z):
        return self.net(z.view(z.size(0), -1, 1, 1))


class Discriminator(nn.Module):
    # DCGAN D, a logit out (as gan_fc.py's D); norm="layer": GroupNorm(1, c), as a gradient penalty is per sample.
    def __init__(self, width=128, norm="batch"):
        super().__init__()
        w, norm = width, nn.BatchNorm2d if norm == "batch" else lambda c: nn.GroupNorm(1, c)
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),  # 14x14
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), norm(2 * w), nn.LeakyReLU(0.2),  # 7x7
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False), norm(4 * w), nn.LeakyReLU(0.2),  # 3x3
            nn.Conv2d(4 * w, 1, 3, 1, 0, bias=False))  # 1x1: one score

    def forward(self, x):
        return self.net(x).view(-1, 1)


def build_models(args):
    G = Generator(args.latent_dim, args.width)
    if args.disc == "fc":  # experiment (b): gan_fc.py's D, logit out; no Dropout in a WGAN critic, which must be one
        p = 0.0 if args.loss in ("wgan", "wgan-gp") else 0.3  # fixed function (clipping or GP bounds its slope)
        return G, nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.LeakyReLU(0.2), nn.Dropout(p), nn.Linear(1024, 512),
                                nn.LeakyReLU(0.2), nn.Dropout(p), nn.Linear(512, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1))
    return G, Discriminator(args.width, "layer" if args.loss == "wgan-gp" else "batch")


# -- Data: the whole training set as one uint8 tensor on the device; no DataLoader, no per-image transforms.
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_fashion_mnist(root, train=True, debian_dir=DEBIAN_DIR):
    """Images (N, 1, 28, 28) uint8 and labels (N,): from root, else Debian's package, else a download."""
    from torchvision.datasets.mnist import FashionMNIST, read_sn3_pascalvincent_tensor as read_idx
    raw = Path(root) / "FashionMNIST" / "raw"
    try:
        for name in FILES:  # Debian's files are gzipped: unpack each once, whole or not at all
            if not (raw / name).exists() and (gz := Path(debian_dir, name + ".gz")).exists():
                raw.mkdir(parents=True, exist_ok=True)
                write_atomically(raw / name, lambda f: f.write(gzip.decompress(gz.read_bytes())))
        if not all((raw / name).exists() for name in FILES):
            FashionMNIST(root, download=True)  # online: torchvision writes the four files into raw/
    except Exception as e:  # offline, or a damaged package
        sys.exit(f"error: cannot get Fashion-MNIST into {raw} ({type(e).__name__}: {e}); offline, run "
                 f"'sudo apt-get install dataset-fashion-mnist' or put the four *-ubyte files in {raw}/")
    try:  # torchvision's idx reader fails on a truncated file, or one that is not an idx file; path names which
        images, labels = [read_idx(str(path := raw / name)) for name in (FILES[:2] if train else FILES[2:])]
    except Exception:
        sys.exit(f"error: {path} is damaged (truncated, or not an idx file); delete it and run again to unpack it "
                 f"anew from Debian's package or download it")
    return images.unsqueeze(1), labels.long()


# -- One D step and one G step (tutorial 2.1) --------------------------------------------------------
def d_step(D, opt_d, real, fake, loss, gp_weight=10.0, clip=0.01, amp=False):
    """One update of D (the critic for WGANs). Returns (loss, mean(real) - mean(fake) scores)."""
    fake = fake.detach()  # D's step must not reach G: the fakes are constants here (tutorial 2.1)
    with torch.autocast(real.device.type, torch.bfloat16, enabled=amp):
        real_scores, fake_scores = D(real), D(fake)
        d_loss = discriminator_loss(loss, real_scores, fake_scores)
    if loss == "wgan-gp":  # WGAN-GP, arXiv 1704.00028, Alg. 1 line 7; a compiled D: its plain module (issue 91469)
        d_loss = d_loss + gp_weight * gradient_penalty(getattr(D, "_orig_mod", D), real, fake)
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
        return tuple(torch.optim.RMSprop(m.parameters(), lr=args.lr) for m in (G, D))
    fused = device.type in ("cuda", "cpu")  # one pass over all parameters, not one op per tensor
    return tuple(torch.optim.Adam(m.parameters(), lr=args.lr, betas=args.betas, fused=fused) for m in (G, D))


# -- What a run writes: sample grids, progress.gif, metrics.csv, losses.png, checkpoint.pt -------------
@torch.no_grad()
def sample(G, z, batch=1000):
    """G's images for noise z as uint8 (N, 1, 28, 28), G in eval mode (BatchNorm uses running stats)."""
    G.eval()
    x = torch.cat([G(chunk).float() for chunk in z.split(batch)])
    G.train()
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def slerp(z0, z1, t):
    """z0 at t=0, z1 at t=1, along the great circle: Gaussian z lies near a sphere (White 2016, arXiv 1609.04468)."""
    omega = torch.cosine_similarity(z0, z1, dim=-1).clamp(-1, 1).acos().unsqueeze(-1)  # the angle between them
    return torch.sin((1 - t) * omega) / torch.sin(omega) * z0 + torch.sin(t * omega) / torch.sin(omega) * z1


def latent_walk(latent_dim, seed, rows=8, steps=10):
    """rows x steps noise vectors, row by row: each row walks from one random z to another (DCGAN paper, 6.1)."""
    z0, z1 = torch.randn(2, rows, 1, latent_dim, generator=torch.Generator().manual_seed(seed))
    return slerp(z0, z1, torch.linspace(0, 1, steps).view(1, steps, 1)).flatten(0, 1)


def write_atomically(path, write):
    """write(file) into path.tmp, then rename that to path: a crash or a full disk never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save reports a full disk as a RuntimeError raised while handling the OSError
        raise e.__context__ if isinstance(e.__context__, OSError) else e
    finally:
        tmp.unlink(missing_ok=True)


def save_grid(images, path, nrow=8):
    write_atomically(path, lambda f: save_image(images.float() / 255, f, format="png", nrow=nrow, padding=2))


def write_gif(out):
    """progress.gif: the fixed-noise grids so far, in epoch order, each captioned with its epoch, looping."""
    from PIL import Image, ImageDraw
    frames = []
    for path in sorted(out.glob("samples_epoch*.png"), key=lambda p: int(p.stem[13:])):
        frames.append(frame := Image.new("L", (242, 258)))  # the 8x8 grid, under a black strip for the caption
        frame.paste(Image.open(path).convert("L").point(lambda v: v & 0xF8), (0, 16))  # 32 greys: a small GIF
        ImageDraw.Draw(frame).text((4, 3), f"epoch {int(path.stem[13:])}", fill=255)
    write_atomically(out / "progress.gif", lambda f: frames[0].save(f, format="GIF", save_all=True, loop=0,
                     append_images=frames[1:], duration=[400] * (len(frames) - 1) + [2000]))  # rests on the last


def write_metrics(history, out, loss):
    from matplotlib.figure import Figure  # drawn into a file, never shown (the tutorial's plt.show() blocks)
    lines = [",".join(history[0])] + [",".join(map(str, row.values())) for row in history]
    write_atomically(out / "metrics.csv", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    ax = Figure(figsize=(6, 3.8), layout="tight").subplots()
    for key in ("d_loss", "g_loss") + (("wasserstein_estimate",) if loss in ("wgan", "wgan-gp") else ()):  # WGAN, 4.2
        ax.plot([row["epoch"] for row in history], [row[key] for row in history], "o-", ms=3, label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel="mean over the epoch", title=f"{loss}: losses")
    ax.legend()
    write_atomically(out / "losses.png", lambda f: ax.figure.savefig(f, format="png", dpi=100))


def load_checkpoint(path, script, keys):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values: runs no code
    except Exception as e:  # missing, truncated, or not tensors-only (weights_only refuses pickled code)
        what = "no such file" if isinstance(e, FileNotFoundError) else f"damaged, or not written by {script}.py"
        sys.exit(f"error: cannot read checkpoint {path}: {what} ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        sys.exit(f"error: {path} is not a checkpoint of {script}.py")
    if any(k not in ckpt for k in keys):
        sys.exit(f"error: {path} is incomplete (no {', '.join(k for k in keys if k not in ckpt)}) to resume from")
    return ckpt


def how_to_continue(args, out, saved, epochs=None):
    """For every message that stops a run: the epoch safe on disk, and the command that continues it."""
    if saved == 0:
        return "nothing was saved yet (the first checkpoint is written after epoch 1)"
    flags = " --amp" * args.amp + f" --device {args.device}" * (args.device != "auto")
    return (f"epoch {saved} is saved in {out / 'checkpoint.pt'}; continue with: python {os.path.relpath(__file__)} "
            f"--resume {out / 'checkpoint.pt'} --epochs {epochs or args.epochs}{flags}")


def output_folder(args):
    """Where this run writes, held while the run lives; without --out the first free runs/<name>, runs/<name>-2, ..."""
    given = Path(args.out) if args.out else Path(args.resume).parent if args.resume else None
    base, others = Path("runs", args.name), lambda d: {p.name for p in d.iterdir()} - {".lock", ".pid"}
    for out in [given] if given else (Path(f"{base}-{k}") if k > 1 else base for k in range(1, 10**6)):
        try:
            if given or not (out.is_dir() and others(out)):  # a numbered folder with another run's files is skipped
                out.mkdir(parents=True, exist_ok=True)
                (lock := FileLock(out / ".lock")).acquire(timeout=0)  # the OS frees it however the process ends
                break
        except Timeout:  # a live process holds it: a run training there, saved or not yet
            if given and not args.generate:  # --generate writes only its own files: it may go on beside a live run
                pid = (out / ".pid").read_text() if (out / ".pid").exists() else "unknown"
                sys.exit(f"error: {out} is in use by another run (process {pid}): wait for it, or choose another --out")
        except OSError as e:
            sys.exit(f"error: cannot write to {out} ({'a file, not a folder' if out.is_file() else e.strerror}); "
                     f"choose another --out")
    held = out / "checkpoint.pt"
    if args.out and held.is_file() and not args.generate and not (args.resume and held.samefile(args.resume)):
        lock.release()  # refused: the folder stays free for its own run's --resume
        epoch = load_checkpoint(held, SCRIPT, ("epoch",))["epoch"]
        sys.exit(f"error: {out} holds a run: {how_to_continue(args, out, epoch, max(args.epochs, epoch + 1))}; "
                 f"or choose another --out")
    if lock.is_locked:  # not when --generate goes on beside a live run
        write_atomically(out / ".pid", lambda f: f.write(str(os.getpid()).encode()))  # names the holder to others
    return out, lock


def pick_device(name):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(n for n, ok in available.items() if ok) if name == "auto" else name
    return torch.device(name) if available[name] else sys.exit(f"error: --device {name} is not available; try --device cpu")


# -- main(): set up, then the loop -------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    need = ("args", "G") if args.generate else ("args", "G", "D", "opt_g", "opt_d", "epoch", "step", "rng", "history")
    ckpt = args.resume and load_checkpoint(args.resume, SCRIPT, need)
    if ckpt:  # continue with the run's own settings; only these may change on resume:
        given = {k: getattr(args, k) for k in "epochs device data_root out sample_every amp resume generate".split()}
        vars(args).update({**ckpt["args"], **{k: v for k, v in given.items() if v is not None}})
        args.betas, args.out = tuple(args.betas) if args.betas else None, given["out"]
    torch.manual_seed(args.seed)
    G, D = (m.to(device) for m in build_models(args))
    if args.generate:  # --generate N --resume PATH: samples and a latent walk from the checkpoint's G, no training
        out, _ = output_folder(args)
        G.load_state_dict(ckpt["G"])
        images = sample(G, torch.randn(args.generate, args.latent_dim, device=device))
        write_atomically(out / "generated.pt", lambda f: torch.save(images, f))
        save_grid(images, out / "generated.png", nrow=math.ceil(math.sqrt(len(images))))
        save_grid(sample(G, latent_walk(args.latent_dim, args.seed).to(device)), out / "interpolation.png", nrow=10)
        return print(f"wrote {out / 'generated.pt'}, generated.png ({args.generate} samples) and interpolation.png")
    opt_g, opt_d = make_optimizers(G, D, args, device)
    start, step, history = (ckpt["epoch"], ckpt["step"], ckpt["history"]) if ckpt else (0, 0, [])
    if ckpt:
        for part, name in ((G, "G"), (D, "D"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            part.load_state_dict(ckpt[name])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        if start >= args.epochs:
            sys.exit(f"error: {args.resume} has already trained {start} epochs; ask for more with --epochs")
    data = load_fashion_mnist(args.data_root or "./data")[0][:args.train_images].to(device)
    # The same noise every time (its own seeded generator), so grids from different epochs compare.
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    B, wgan = args.batch_size, args.loss in ("wgan", "wgan-gp")
    steps_per_epoch = len(data) // B  # full batches; a different remainder is left out each epoch
    if steps_per_epoch == 0:
        sys.exit(f"error: --batch-size {B} is larger than the {len(data)} training images")
    out, lock = output_folder(args)  # held until the loop ends: no other run writes there meanwhile
    args.out = str(out)
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}  # an older PyTorch: unknown
    if args.amp and device.type == "cpu" and caps and not any(caps.get(k) for k in ("avx512_bf16", "amx_bf16", "bf16")):
        print("warning: this CPU has no bf16 instructions, so PyTorch emulates bf16 and --amp is much slower; drop --amp")
    print(f"{SCRIPT}: {args.loss} on {device}, {len(data)} images, writing to {out}", flush=True)  # out now, warning too
    stop = []  # Ctrl-C (SIGINT) or a job scheduler's SIGTERM lands here; the loop stops after the current step
    previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for epoch in range(start + 1, args.epochs + 1):
            t0 = time.perf_counter()
            perm = torch.randperm(len(data), device=device)
            sums = torch.zeros(3, device=device)  # D loss, W estimate, G loss, summed on the device (no sync)
            g_steps, every = 0, max(1, steps_per_epoch // 10)
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=None)
            for i in bar:
                real = data[perm[i * B:(i + 1) * B]].float() / 127.5 - 1  # [-1, 1], as the tutorial's Normalize
                g_turn = (step + 1) % args.n_critic == 0  # G steps once every n_critic critic steps
                # One G forward serves both steps: D sees it detached, and G's step reuses it with its graph.
                with torch.set_grad_enabled(g_turn), torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                    fake = G(torch.randn(B, args.latent_dim, device=device))
                d_loss, w_est = d_step(D, opt_d, real, fake, args.loss, args.gp_weight, args.clip, args.amp)
                sums[:2] += torch.stack([d_loss, w_est])
                if g_turn:
                    sums[2] += g_step(D, opt_g, fake, args.loss, args.amp)
                    g_steps += 1
                step += 1
                if stop:
                    tqdm.write(f"interrupted by {signal.Signals(stop[0]).name} in epoch {epoch}/{args.epochs}; "
                               f"{how_to_continue(args, out, epoch - 1)}", file=sys.stderr)
                    sys.exit(128 + stop[0])  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
                if i == 4 and epoch == start + 1 and device.type == "cpu" and getattr(args, "width", 0) >= 64:
                    tqdm.write(f"at this pace an epoch takes {(time.perf_counter() - t0) / 300 * steps_per_epoch:.0f} "
                               f"min on this CPU; --width 32 is about 10x faster")  # gan_conv.py's widths >= 64
                if (i + 1) % every == 0 or i + 1 == steps_per_epoch:  # a device sync, so only ten times an epoch
                    d, w, g = (sums / torch.tensor([i + 1, i + 1, max(g_steps, 1)], device=device)).tolist()
                    if not (math.isfinite(d) and math.isfinite(g)):
                        sys.exit(f"error: the loss became {d if not math.isfinite(d) else g} in epoch {epoch}, so "
                                 f"training stopped; try a lower --lr ({how_to_continue(args, out, epoch - 1)})")
                    bar.set_postfix(D=f"{d:.3f}", G=f"{g:.3f}")
                    if bar.disable and i + 1 < steps_per_epoch:  # no terminal (a log file): tqdm draws nothing
                        print(f"  step {i + 1}/{steps_per_epoch}  D {d:.4f}  G {g:.4f}  "
                              f"{(time.perf_counter() - t0) / (i + 1) * (steps_per_epoch - i - 1):.0f} s left", flush=True)
            seconds = time.perf_counter() - t0
            history.append(dict(epoch=epoch, d_loss=round(d, 5), g_loss=round(g, 5), wasserstein_estimate=round(w, 5) if wgan
                                else "", seconds=round(seconds, 2), images_per_sec=round(steps_per_epoch * B / seconds, 1)))
            try:  # each file is written whole or not at all, the checkpoint last: it never runs ahead of the rest
                if epoch % args.sample_every == 0 or epoch == args.epochs:
                    save_grid(sample(G, fixed_z), out / f"samples_epoch{epoch:03d}.png")
                    write_gif(out)
                write_metrics(history, out, args.loss)
                rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
                state = dict(script=SCRIPT, epoch=epoch, step=step, args=vars(args), G=G.state_dict(), D=D.state_dict(),
                             opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(), rng=rng, history=history)
                write_atomically(out / "checkpoint.pt", lambda f: torch.save(state, f))
            except OSError as e:  # a full disk, a folder gone read-only: the previous checkpoint is intact
                sys.exit(f"error: cannot write to {out} ({e.strerror or e}); {how_to_continue(args, out, epoch - 1)}")
            print(f"epoch {epoch}/{args.epochs}  D {d:.4f}  G {g:.4f}{f'  W {w:.4f}' if wgan else ''}  "
                  f"{seconds:.1f} s  {steps_per_epoch * B / seconds:.0f} img/s", flush=True)
            if stop:  # the signal came while saving: this epoch is whole on disk, and the run stops here
                print(f"interrupted by {signal.Signals(stop[0]).name} while saving epoch {epoch}/{args.epochs}; "
                      f"{how_to_continue(args, out, epoch, max(args.epochs, epoch + 1))}", file=sys.stderr)
                sys.exit(128 + stop[0])
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"error: out of {device.type} memory in epoch {epoch} at --batch-size {B}; try a smaller --batch-size"
                 f"{' or --width' if hasattr(args, 'width') else ''}; {how_to_continue(args, out, epoch - 1)}")
    finally:  # the folder is free for others again (a process that ends any other way frees it too)
        lock.release()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"done: samples, progress.gif, metrics.csv, losses.png and checkpoint.pt in {out}")


if __name__ == "__main__":
    main()
