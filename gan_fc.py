"""A fully-connected GAN on Fashion-MNIST: the tutorial's experiment (a), G and D fully connected.

    python gan_fc.py --epochs 50                 # --loss bce | lsgan | wgan | wgan-gp

The file reads top to bottom as the tutorial does: 1. the arguments, 2. the models (tutorial 2.2),
3. the data, 4. one D step and one G step (2.1), 5. the training loop, 6. main(), 7. samples from
a trained G. The banner after them marks the machinery that keeps a run safe: a reader may skip it.
From section 3 on, gan_conv.py is this file word for word. The losses are in losses.py (tutorial 4).
"""
import argparse
import contextlib
import copy
import dataclasses
import gzip
import hashlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock, Timeout  # installed with PyTorch
from torchvision.utils import save_image
from tqdm import tqdm

from losses import LOSSES, clip_weights, discriminator_loss, generator_loss, gradient_penalty

SCRIPT = "gan_fc"


# ==================================================================================================
# 1. Arguments
# ==================================================================================================
# BCE and LSGAN train with the tutorial's settings (DCGAN's, arXiv 1511.06434); the WGANs with their
# paper's Algorithm 1: WGAN (1701.07875) at lr 1e-4, not 5e-5, which is too slow for 50 epochs
# (docs/experiments.md), and WGAN-GP (1704.00028) as printed.
DEFAULTS = dict(loss="bce", epochs=50, latent_dim=100, clip=0.01, gp_weight=10.0, cond=False,
                ema=0.0, seed=0, device="auto", data_root="data", train_images=60000,
                sample_every=5, max_minutes=0.0, amp=False)
LOSS_DEFAULTS = {
    "bce": dict(lr=2e-4, betas=(0.5, 0.999), n_critic=1, batch_size=128),
    "lsgan": dict(lr=2e-4, betas=(0.5, 0.999), n_critic=1, batch_size=128),
    "wgan": dict(lr=1e-4, betas=None, n_critic=5, batch_size=64),  # RMSprop: no betas
    "wgan-gp": dict(lr=1e-4, betas=(0.0, 0.9), n_critic=5, batch_size=128),
}
EMA_DECAY = 0.999  # a bare --ema (docs/experiments.md measures it against 0.9999)


def speed_hint(args):
    """What the machinery suggests when an epoch is slow."""
    return "--train-images 6000 trains on a tenth of the images, for a first look"


def command_line():
    """The flags. Each is None unless given, so a resumed run can tell what was typed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=LOSSES, help="the GAN loss, tutorial 4 (default: bce)")
    parser.add_argument("--epochs", type=int, help="passes over the training set (default: 50)")
    parser.add_argument("--batch-size", type=int,
                        help=f"images a step (default: {per_loss('batch_size')})")
    parser.add_argument("--latent-dim", type=int, help="size of the noise vector z (default: 100)")
    parser.add_argument("--lr", type=float, help=f"G's and D's (default: {per_loss('lr')})")
    parser.add_argument("--betas", type=float, nargs=2,
                        help="Adam's (default: 0.5 0.999; wgan-gp 0.0 0.9; wgan has RMSprop)")
    parser.add_argument("--n-critic", type=int,
                        help=f"D steps per G step (default: {per_loss('n_critic')})")
    parser.add_argument("--clip", type=float, help="wgan: clip critic weights to [-c, c] (0.01)")
    parser.add_argument("--gp-weight", type=float, help="wgan-gp: the penalty's weight lambda (10)")
    parser.add_argument("--cond", action="store_true", default=None,
                        help="a class-conditional GAN: G and D are told each image's class")
    parser.add_argument("--ema", type=float, nargs="?", const=EMA_DECAY, metavar="DECAY",
                        help=f"also keep an average of G to sample from (bare: {EMA_DECAY})")
    parser.add_argument("--seed", type=int, help="seed of weights, noise and batches (default: 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"),
                        help="auto: CUDA, else MPS, else the CPU (default: auto)")
    parser.add_argument("--data-root", help="the folder that holds FashionMNIST/ (default: data)")
    parser.add_argument("--train-images", type=int, help="the first N only (default: all 60000)")
    parser.add_argument("--out", help="output folder (default: the first free runs/<name>, "
                                      "runs/<name>-2, ...)")
    parser.add_argument("--sample-every", type=int, help="epochs between sample grids (default: 5)")
    parser.add_argument("--max-minutes", type=float, metavar="M",
                        help="stop, saved, before an epoch that would end past M minutes")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction,
                        help="bf16 autocast, faster on recent GPUs and CPUs (default: off)")
    parser.add_argument("--resume", metavar="PATH",
                        help="continue the run of this checkpoint.pt, with its own settings")
    parser.add_argument("--generate", type=int, metavar="N",
                        help="with --resume: write N samples and a latent walk, train nothing")
    parser.add_argument("--class", dest="class_name", metavar="NAME",
                        help="with --generate, a --cond run: this class only, by name or 0-9")
    return parser


def per_loss(setting):
    """One setting's default for each loss, as the help shows it."""
    return ", ".join(f"{loss} {LOSS_DEFAULTS[loss][setting]:g}" for loss in LOSSES)


def complete_args(args):
    """Fill in every setting that is None from the defaults of the run's loss; check them all."""
    loss = args.loss or DEFAULTS["loss"]
    for name, value in {**DEFAULTS, **LOSS_DEFAULTS[loss]}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.loss == "wgan" and args.betas is not None:
        fail("--betas is for Adam; --loss wgan trains with RMSprop (WGAN paper, section 3)")
    if args.betas is not None:
        args.betas = tuple(args.betas)
    for name in ("epochs", "batch_size", "latent_dim", "n_critic", "sample_every", "train_images"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.clip <= 0 or args.gp_weight < 0:
        fail("--lr and --clip must be positive, and --gp-weight not negative")
    if args.max_minutes < 0:
        fail(f"--max-minutes must not be negative (0: no limit), got {args.max_minutes:g}")
    if not 0 <= args.ema < 1:
        fail(f"--ema takes a decay from 0 to 1, such as {EMA_DECAY}, got {args.ema:g}")
    if args.generate is not None and (args.generate < 1 or not args.resume):
        fail("--generate N needs N >= 1 and --resume CHECKPOINT")
    if getattr(args, "class_name", None) is not None and args.generate is None:
        fail("--class NAME goes with --generate N (and --resume of a --cond run)")
    args.name = f"fc_{args.loss}"  # the default folder is runs/<name>
    if args.cond:
        args.name += "_cond"
    return args


# ==================================================================================================
# 2. Models (tutorial 2.2): G maps noise z to a 1x28x28 image in [-1, 1]; D maps an image to a score
# ==================================================================================================
class Generator(nn.Module):
    # With --cond, z is followed by the class, one-hot (Mirza & Osindero, arXiv 1411.1784).
    def __init__(self, latent_dim=100, classes=0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim + classes, 256), nn.ReLU(),
            nn.Linear(256, 512), nn.ReLU(),
            nn.Linear(512, 1024), nn.ReLU(),
            nn.Linear(1024, 28 * 28), nn.Tanh(),  # pixels in [-1, 1], as the normalised data
        )

    def forward(self, z, labels=None):
        if labels is not None:  # --cond: the class joins the noise
            z = torch.cat([z, one_hot(labels)], dim=1)
        return self.net(z).view(-1, 1, 28, 28)


class Discriminator(nn.Module):
    # No final Sigmoid: D returns a raw score (a logit). BCE applies the sigmoid inside, which is
    # stable and allowed under autocast; LSGAN and the WGANs want the raw score (tutorial 4.2, 4.4).
    def __init__(self, dropout=0.3, classes=0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(28 * 28, 1024), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(1024, 512), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.LeakyReLU(0.2),
            nn.Linear(256, 1),
        )
        if classes:  # --cond: a learned vector per class, one value a feature of the last layer
            self.embed = nn.Embedding(classes, 256)
            nn.init.zeros_(self.embed.weight)  # the class term starts at 0: at first, the plain D

    def forward(self, x, labels=None):
        x = x.flatten(1)
        if labels is None:
            return self.net(x)
        # --cond: the projection D (Miyato & Koyama, arXiv 1802.05637, eq. 3): the score, plus the
        # agreement of the class's vector with the last hidden layer's 256 features.
        features = self.net[:-1](x)
        return self.net[-1](features) + (self.embed(labels) * features).sum(1, keepdim=True)


def one_hot(labels):
    """--cond: class indices (N,) as one-hot rows (N, 10), which G's first layer multiplies by its
    weights: one learned column per class, which is what nn.Embedding would give. Rows of class
    weights (N, 10) pass as they are: a walk from one class to another."""
    if labels.is_floating_point():
        return labels
    return F.one_hot(labels, len(CLASS_NAMES)).float()


MODEL_FLAGS = ()  # flags that build other models (gan_conv.py's --disc, --width): none here


def build_models(args):
    classes = 0
    if args.cond:  # --cond: G and D are told the class (Mirza & Osindero, arXiv 1411.1784)
        classes = len(CLASS_NAMES)
    # A WGAN critic is one fixed function, whose slope clipping or the penalty bounds: no Dropout.
    dropout = 0.3
    if args.loss in ("wgan", "wgan-gp"):
        dropout = 0.0
    return Generator(args.latent_dim, classes), Discriminator(dropout, classes)


# ==================================================================================================
# 3. Data: Fashion-MNIST, 60,000 training images, as one uint8 tensor on the device
# ==================================================================================================
# Labels 0 to 9; the dataset's own names are longer for two of them: T-shirt/top, Ankle boot.
CLASS_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Boot")


def load_fashion_mnist(root, train=True, debian_dir=None):
    """Images (N, 1, 28, 28) uint8 in [0, 255] and labels (N,) of the training set (or the test
    set), from root/FashionMNIST/raw/, which fetch_fashion_mnist() fills on the first run."""
    image_file, label_file = fetch_fashion_mnist(root, train, debian_dir)
    images = read_idx(image_file)
    labels = read_idx(label_file)
    return images.unsqueeze(1), labels.long()


# ==================================================================================================
# 4. One D step and one G step (tutorial 2.1)
# ==================================================================================================
def d_step(D, opt_d, real, fake, loss, gp_weight=10.0, clip=0.01, amp=False, labels=None):
    """One update of D (the critic, for WGANs). Returns D's loss and mean D(real) - mean D(fake).
    labels: --cond's classes of the batch, real and fake alike (None without --cond)."""
    fake = fake.detach()  # D's step must not reach G: the fakes are constants here (tutorial 2.1)
    with torch.autocast(real.device.type, torch.bfloat16, enabled=amp):
        real_scores = D(real, labels)
        fake_scores = D(fake, labels)
        d_loss = discriminator_loss(loss, real_scores, fake_scores)
    if loss == "wgan-gp":  # WGAN-GP, arXiv 1704.00028, Algorithm 1, line 7
        d_loss = d_loss + gp_weight * gradient_penalty(D, real, fake, labels)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    if loss == "wgan":  # WGAN, arXiv 1701.07875, Algorithm 1, line 7
        clip_weights(D, clip)
    score_gap = real_scores.float().mean() - fake_scores.float().mean()  # W's estimate, for WGANs
    return d_loss.detach(), score_gap.detach()


def g_step(D, opt_g, fake, loss, amp=False, labels=None):
    """One update of G through D's graph. D's weights get no gradient (the tutorial's do)."""
    D.requires_grad_(False)
    with torch.autocast(fake.device.type, torch.bfloat16, enabled=amp):
        g_loss = generator_loss(loss, D(fake, labels))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    D.requires_grad_(True)
    return g_loss.detach()


@torch.no_grad()
def update_average(G_ema, G, decay, g_steps):
    """--ema: G_ema = decay * G_ema + (1 - decay) * G, weights and BatchNorm's running
    statistics alike, after every G step (Yazici et al., arXiv 1806.04498). The decay grows as
    (1 + t) / (10 + t) until it reaches its own (0.999 after about 9,000 steps): the first weights,
    drawn at random, weigh under 0.1% of the average after 5 steps, and the average stays short
    while G changes fast (a warm-up, as TensorFlow's moving averages have)."""
    decay = min(decay, (1 + g_steps) / (10 + g_steps))
    for average, current in zip(G_ema.state_dict().values(), G.state_dict().values()):
        if average.is_floating_point():
            average.lerp_(current, 1 - decay)
        else:
            average.copy_(current)  # BatchNorm's count of batches seen


def make_optimizers(G, D, args, device):
    if args.loss == "wgan":  # WGAN, section 3: momentum made the critic unstable
        opt_g = torch.optim.RMSprop(G.parameters(), lr=args.lr)
        opt_d = torch.optim.RMSprop(D.parameters(), lr=args.lr)
        return opt_g, opt_d
    fused = device.type in ("cuda", "cpu")  # one kernel over all parameters, not one per tensor
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=args.betas, fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=args.betas, fused=fused)
    return opt_g, opt_d


# ==================================================================================================
# 5. The training loop (tutorial 2.2)
# ==================================================================================================
def train(G, D, opt_g, opt_d, data, args, run, data_labels=None, G_ema=None):
    """Every epoch, the images in a new order; every batch, one D step, and one G step every
    n_critic batches. `run` is the bookkeeping below the banner: progress, checkpoints, Ctrl-C.
    data_labels: the classes of the images (--cond); G_ema: the average of G (--ema)."""
    device = data.device
    batch_size = args.batch_size
    steps_per_epoch = len(data) // batch_size  # full batches; each epoch drops another remainder
    # The same 64 noise vectors for every grid, so the epochs compare (the tutorial draws new ones).
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    fixed_z = fixed_z.to(device)
    fixed_labels = None
    if args.cond:  # --cond: a row per class, the same 10 noise vectors in each row
        fixed_z = fixed_z[:10].repeat(len(CLASS_NAMES), 1)
        fixed_labels = torch.arange(len(CLASS_NAMES), device=device).repeat_interleave(10)
    shown = G  # the generator the grids show: G, or its average (--ema)
    if G_ema is not None:
        shown = G_ema
    step = run.step  # D steps so far: 0, or the resumed run's
    for epoch in range(run.epoch + 1, args.epochs + 1):
        start_epoch(run, epoch, steps_per_epoch)
        order = torch.randperm(len(data), device=device)
        for i in range(steps_per_epoch):
            batch = order[i * batch_size:(i + 1) * batch_size]
            real = data[batch].float() / 127.5 - 1  # pixels in [-1, 1], as the tutorial's Normalize
            labels = None
            if args.cond:  # --cond: the fakes take the real batch's classes: one class mix for D
                labels = data_labels[batch]
            step += 1
            g_turn = step % args.n_critic == 0  # G steps once every n_critic D steps
            # One G forward serves both steps: D sees it detached, G's step reuses its graph.
            autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.amp)
            with torch.set_grad_enabled(g_turn), autocast:
                fake = G(torch.randn(batch_size, args.latent_dim, device=device), labels)
            d_loss, w_estimate = d_step(D, opt_d, real, fake, args.loss, args.gp_weight, args.clip,
                                        args.amp, labels)
            g_loss = None
            if g_turn:
                g_loss = g_step(D, opt_g, fake, args.loss, args.amp, labels)
                if G_ema is not None:  # --ema: the average follows G
                    update_average(G_ema, G, args.ema, step // args.n_critic)
            log_step(run, step, i, d_loss, w_estimate, g_loss)  # progress; stops after a Ctrl-C
        grid = None
        if epoch % args.sample_every == 0 or epoch == args.epochs:
            grid = sample(shown, fixed_z, fixed_labels)
        end_epoch(run, G, D, opt_g, opt_d, grid, G_ema)  # grid, metrics.csv, checkpoint.pt


# ==================================================================================================
# 6. main(): set up, then train
# ==================================================================================================
def main(argv=None):
    args = parse_args(argv)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.resume, training=not args.generate)
        args = resumed_args(args, checkpoint)  # the run's own settings, and the flags given now
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    G, D = build_models(args)
    G = G.to(device)
    D = D.to(device)
    if args.generate:
        G.load_state_dict(generator_weights(checkpoint))  # the average, where the run kept one
        write_generated(G, args, checkpoint, device)
        return
    G_ema = None
    if args.ema:  # --ema: a copy of G that follows it as a moving average
        G_ema = copy.deepcopy(G)
    opt_g, opt_d = make_optimizers(G, D, args, device)
    if checkpoint:
        restore(checkpoint, G, D, opt_g, opt_d, args, device, G_ema)
    images, labels = load_fashion_mnist(args.data_root)
    data = images[:args.train_images].to(device)
    data_labels = labels[:args.train_images].to(device)
    if len(data) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the {len(data)} training images")
    run = open_run(args, device, checkpoint, len(data))  # its folder, held; a clean Ctrl-C
    try:
        train(G, D, opt_g, opt_d, data, args, run, data_labels, G_ema)
    except TimeUp as stop:  # --max-minutes: the run is saved, and the message says how to go on
        print(stop, flush=True)
        return
    except torch.cuda.OutOfMemoryError:
        half = max(1, args.batch_size // 2)
        smaller = how_to_continue(run, f" --batch-size {half}")
        fail(f"out of {device.type} memory in epoch {run.epoch + 1} at --batch-size "
             f"{args.batch_size}; try a smaller --batch-size: {smaller}")
    finally:
        close_run(run)
    print(f"done: samples, progress.gif, metrics.csv, losses.png and checkpoint.pt in {run.out}")


# ==================================================================================================
# 7. Samples from a trained G: a grid, and a walk through its latent space
# ==================================================================================================
@torch.no_grad()
def sample(G, z, labels=None, batch=1000):
    """G's images for noise z (and --cond's classes) as uint8 (N, 1, 28, 28). G in eval mode:
    BatchNorm uses its running statistics, so each image depends on its own z only (the tutorial
    samples in train mode, where each image depends on the whole batch)."""
    G.eval()
    label_chunks = [None] * len(z.split(batch))
    if labels is not None:
        label_chunks = labels.split(batch)
    images = torch.cat([G(chunk, chunk_labels).float()
                        for chunk, chunk_labels in zip(z.split(batch), label_chunks)])
    G.train()
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def slerp(z0, z1, t):
    """z0 at t=0 to z1 at t=1 along the great circle: Gaussian z lies near a sphere (White 2016,
    arXiv 1609.04468), and the straight line between two z passes through unlikely short ones."""
    angle = torch.cosine_similarity(z0, z1, dim=-1).clamp(-1, 1).acos().unsqueeze(-1)
    weight0 = torch.sin((1 - t) * angle) / torch.sin(angle)
    weight1 = torch.sin(t * angle) / torch.sin(angle)
    return weight0 * z0 + weight1 * z1


def latent_walk(latent_dim, seed, rows=8, steps=10):
    """rows x steps noise vectors, row by row, each row from one random z to another (DCGAN 6.1)."""
    ends = torch.randn(2, rows, 1, latent_dim, generator=torch.Generator().manual_seed(seed))
    t = torch.linspace(0, 1, steps).view(1, steps, 1)
    return slerp(ends[0], ends[1], t).flatten(0, 1)


def write_generated(G, args, checkpoint, device):
    """--generate N: N samples (generated.pt, .png) and the latent walk (interpolation.png). A
    --cond run draws --class NAME, or every class in turn, and walks with the class held."""
    labels = None
    walk_labels = None
    walk_rows = 8
    if args.cond:
        labels = torch.arange(args.generate, device=device) * len(CLASS_NAMES) // args.generate
        walk_rows = len(CLASS_NAMES)
        walk_labels = torch.arange(walk_rows, device=device).repeat_interleave(10)
        if args.class_name is not None:
            labels = torch.full_like(labels, class_index(args.class_name))
            walk_labels = torch.full_like(walk_labels, class_index(args.class_name))
    elif args.class_name is not None:
        fail(f"--class needs a run trained with --cond; {args.resume} was not")
    out, lock = generate_folder(args, checkpoint)
    images = sample(G, torch.randn(args.generate, args.latent_dim, device=device), labels)
    with write_atomically(out / "generated.pt") as f:
        torch.save(images, f)
    save_grid(images, out / "generated.png", nrow=math.ceil(math.sqrt(len(images))))
    walk = latent_walk(args.latent_dim, args.seed, walk_rows).to(device)
    save_grid(sample(G, walk, walk_labels), out / "interpolation.png", nrow=10)
    if lock:
        lock.release()
    drawn = f"{args.generate} samples"
    if args.class_name is not None:
        drawn += f" of class {CLASS_NAMES[class_index(args.class_name)]}"
    print(f"wrote {out / 'generated.pt'}, generated.png ({drawn}) and interpolation.png")


# ##################################################################################################
# The machinery that keeps a run safe. You may stop reading here: nothing below is about GANs.
# A run holds its folder with a lock, writes every file whole or not at all, saves a checkpoint
# each epoch, stops cleanly on Ctrl-C, prints its progress and draws progress.gif and losses.png.
# ##################################################################################################
SLOW_EPOCH_SECONDS = 120  # an epoch slower than this is announced early, with how to go faster
FIXED_ON_RESUME = ("loss", "latent_dim", "seed", "cond", "ema", *MODEL_FLAGS)  # --resume keeps them


class TimeUp(Exception):
    """--max-minutes ran out: the message says what is saved and how to go on."""


def parse_args(argv=None):
    """The command line: a mistake stops in one line; each setting not given takes its default."""
    parser = command_line()
    parser.error = fail  # one line, no usage dump
    args = parser.parse_args(argv)
    args.given = [name for name, value in vars(args).items() if value is not None]
    return complete_args(args)


def fail(message):
    """Stop with one line on stderr and exit status 1: no traceback for a user's mistake."""
    sys.exit(f"error: {message}")


@dataclasses.dataclass
class Run:
    """One training run's bookkeeping; the loop reads run.epoch (the last saved) and run.step."""
    args: argparse.Namespace
    device: torch.device
    out: Path
    lock: FileLock
    epoch: int = 0
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    signals: list = dataclasses.field(default_factory=list)  # Ctrl-C (SIGINT) or SIGTERM, when sent
    old_handlers: dict = dataclasses.field(default_factory=dict)
    sums: torch.Tensor = None  # this epoch's D loss, W estimate and G loss, summed on the device
    g_steps: int = 0
    means: tuple = (math.nan, math.nan, math.nan)
    started: float = 0.0
    pace_from: float = 0.0
    bar: tqdm = None
    first_epoch: int = 1
    deadline: float = math.inf  # --max-minutes, on time.perf_counter()'s clock


def load_checkpoint(path, training=True):
    """A whole checkpoint of this script: tensors and plain values (weights_only runs no code)."""
    check_listed_sum(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, truncated, or not tensors-only
        what = f"damaged, or not written by {SCRIPT}.py"
        if isinstance(error, FileNotFoundError):
            what = "no such file"
        fail(f"cannot read checkpoint {path}: {what} ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != SCRIPT:
        fail(f"{path} is not a checkpoint of {SCRIPT}.py")
    needed = ["args"]
    if training:
        needed += ["G", "D", "opt_g", "opt_d", "epoch", "step", "rng", "history"]
    elif "G_ema" not in checkpoint:  # a file in pretrained/ may hold the average of G alone
        needed.append("G")
    if training and checkpoint.get("args", {}).get("ema"):
        needed.append("G_ema")
    missing = [key for key in needed if key not in checkpoint]
    if missing:
        message = f"{path} is incomplete (no {', '.join(missing)}) to resume from"
        message += "; it can --generate"
        if "command" in checkpoint:  # a pretrained generator
            message += f"; this command trains one: {checkpoint['command']}"
        fail(message)
    return checkpoint


def check_listed_sum(path):
    """A file that a SHA256SUMS beside it lists (pretrained/) must have that sum: a damaged file
    could still load, and generate nonsense."""
    path = Path(path)
    sums = path.parent / "SHA256SUMS"
    if not path.is_file() or not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        expected, _, listed = line.partition("  ")
        if Path(listed).name != path.name:
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            fail(f"{path} does not match its SHA-256 in {sums}: it is damaged; restore it with "
                 f"'git checkout -- {path}'")


def resumed_args(args, checkpoint):
    """The run's own settings. A flag given on this command line is applied if it can change
    mid-run; one that would make another run (FIXED_ON_RESUME) is refused unless it is the run's."""
    settings = {name: value for name, value in checkpoint["args"].items() if value is not None}
    for name in args.given:
        value = getattr(args, name)
        fixed = name in FIXED_ON_RESUME
        if name == "seed" and args.generate:  # --generate: the seed of the noise only
            fixed = False
        if fixed and value != settings.get(name):
            flag = "--" + name.replace("_", "-")
            fail(f"{flag} cannot change when a run resumes (this run has {flag} "
                 f"{settings.get(name)}); to train with {flag} {value}, start a new run")
        settings[name] = value
    for name in ("resume", "generate", "class_name", "out", "given"):  # this command line's only
        settings[name] = getattr(args, name)
    resumed = complete_args(argparse.Namespace(**settings))  # settings newer than the run: defaults
    if not args.generate and checkpoint["epoch"] >= resumed.epochs:
        done = checkpoint["epoch"]
        more = resume_command(args.resume, f" --epochs {done + 10}")
        fail(f"{args.resume} has already trained {done} epochs; to train on, ask for more: {more}")
    return resumed


def restore(checkpoint, G, D, opt_g, opt_d, args, device, G_ema=None):
    """Weights, optimizer states and random state as saved; the optimizers get args' lr, betas."""
    G.load_state_dict(checkpoint["G"])
    D.load_state_dict(checkpoint["D"])
    if G_ema is not None:
        G_ema.load_state_dict(checkpoint["G_ema"])
    opt_g.load_state_dict(checkpoint["opt_g"])
    opt_d.load_state_dict(checkpoint["opt_d"])
    for optimizer in (opt_g, opt_d):
        for group in optimizer.param_groups:
            group["lr"] = args.lr
            if "betas" in group:  # Adam's; RMSprop has none
                group["betas"] = args.betas
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])


def generator_weights(checkpoint):
    """The G to draw samples from: the run's average of G where it kept one (--ema), else G."""
    if "G_ema" in checkpoint:
        return checkpoint["G_ema"]
    return checkpoint["G"]


def class_index(name):
    """--class: a class's index from its name (any case) or from its index, 0 to 9."""
    names = [known.lower() for known in CLASS_NAMES]
    if name.lower() in names:
        return names.index(name.lower())
    if name.isdigit() and int(name) < len(CLASS_NAMES):
        return int(name)
    fail(f"--class {name} is not a class; give one of {', '.join(CLASS_NAMES)}, or 0 to 9")


def open_run(args, device, checkpoint, images):
    """Claim the run's folder, say where it writes, catch Ctrl-C to stop after the current step."""
    out, lock = output_folder(args)
    args.out = str(out)
    run = Run(args=args, device=device, out=out, lock=lock)
    if checkpoint:
        run.epoch = checkpoint["epoch"]
        run.step = checkpoint["step"]
        run.history = checkpoint["history"]
    run.first_epoch = run.epoch + 1
    if args.max_minutes:
        run.deadline = time.perf_counter() + 60 * args.max_minutes
    capabilities = {}
    if hasattr(torch.cpu, "get_capabilities"):  # an older PyTorch cannot tell
        capabilities = torch.cpu.get_capabilities()
    has_bf16 = any(capabilities.get(name) for name in ("avx512_bf16", "amx_bf16", "bf16"))
    if args.amp and device.type == "cpu" and capabilities and not has_bf16:
        print("warning: this CPU has no bf16 instructions, so PyTorch emulates bf16 and --amp is "
              "much slower; drop --amp")
    print(f"{SCRIPT}: {args.loss} on {device}, {images} images, writing to {out}", flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        run.old_handlers[signum] = signal.signal(signum, on_signal(run))
    return run


def on_signal(run):
    def handler(signum, frame):
        run.signals.append(signum)  # the loop stops after the current step
    return handler


def close_run(run):
    """The folder is free for others again (a process that ends any other way frees it too)."""
    run.lock.release()
    for signum, handler in run.old_handlers.items():
        signal.signal(signum, handler)


def start_epoch(run, epoch, steps_per_epoch):
    run.started = time.perf_counter()
    if run.history and run.started + run.history[-1]["seconds"] > run.deadline:
        limit = run.args.max_minutes
        raise TimeUp(f"stopped by --max-minutes {limit:g} before epoch {epoch}, which would end "
                     f"past it; {how_to_continue(run)}")
    run.sums = None
    run.g_steps = 0
    run.bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{run.args.epochs}", leave=False,
                   disable=None)  # disable=None: no bar without a terminal


def log_step(run, step, i, d_loss, w_estimate, g_loss):
    """After each step: sum the losses, show progress ten times an epoch, stop after a Ctrl-C."""
    run.step = step
    epoch = run.epoch + 1
    if g_loss is None:
        g_loss = torch.zeros_like(d_loss)
    else:
        run.g_steps += 1
    losses = torch.stack([d_loss, w_estimate, g_loss])
    if run.sums is None:
        run.sums = losses
    else:
        run.sums = run.sums + losses
    run.bar.update()
    if time.perf_counter() > run.deadline:  # an epoch slower than the last: stop within it
        run.bar.close()
        minutes = math.ceil((time.perf_counter() - run.started) / (i + 1) * run.bar.total / 60)
        more = f" --max-minutes {minutes + 1}"
        raise TimeUp(f"stopped by --max-minutes {run.args.max_minutes:g} in epoch {epoch}, which "
                     f"takes about {minutes} min here; {how_to_continue(run, more)}")
    if run.signals:
        name = signal.Signals(run.signals[0]).name
        tqdm.write(f"interrupted by {name} in epoch {epoch}/{run.args.epochs}; "
                   f"{how_to_continue(run)}", file=sys.stderr)
        sys.exit(128 + run.signals[0])  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
    steps = run.bar.total
    seconds = time.perf_counter() - run.started
    if epoch == run.first_epoch and i == 4:  # the pace from step 5 on, after the warm-up
        run.pace_from = time.perf_counter()
    if epoch == run.first_epoch and i == 14:
        epoch_seconds = (time.perf_counter() - run.pace_from) / 10 * steps
        run_hours = epoch_seconds * (run.args.epochs - epoch + 1) / 3600
        if epoch_seconds > SLOW_EPOCH_SECONDS:
            tqdm.write(f"at this pace an epoch takes {epoch_seconds / 60:.0f} min on this "
                       f"{run.device.type}, and the run {run_hours:.1f} h; {speed_hint(run.args)}")
    if (i + 1) % max(1, steps // 10) != 0 and i + 1 != steps:
        return
    counts = torch.tensor([i + 1, i + 1, max(run.g_steps, 1)], device=run.device)
    run.means = tuple((run.sums / counts).tolist())  # a device sync, so only ten times an epoch
    d, w, g = run.means
    if not (math.isfinite(d) and math.isfinite(g)):
        half = f"{run.args.lr / 2:g}"
        fail(f"the loss became {d if not math.isfinite(d) else g} in epoch {epoch}, so training "
             f"stopped; try a lower --lr: {how_to_continue(run, f' --lr {half}')}")
    run.bar.set_postfix(D=f"{d:.3f}", G=f"{g:.3f}")
    if run.bar.disable and i + 1 < steps:  # no terminal (a log file): a line instead of the bar
        left = seconds / (i + 1) * (steps - i - 1)
        print(f"  step {i + 1}/{steps}  D {d:.4f}  G {g:.4f}  {left:.0f} s left", flush=True)


def end_epoch(run, G, D, opt_g, opt_d, grid, G_ema=None):
    """Write the epoch's files, each whole or not at all, the checkpoint last: never ahead."""
    run.bar.close()
    args = run.args
    seconds = time.perf_counter() - run.started
    images_per_sec = run.bar.total * args.batch_size / seconds
    run.epoch += 1
    d, w, g = run.means
    wgan = args.loss in ("wgan", "wgan-gp")
    run.history.append(dict(epoch=run.epoch, d_loss=round(d, 5), g_loss=round(g, 5),
                            wasserstein_estimate=round(w, 5) if wgan else "",
                            seconds=round(seconds, 2), images_per_sec=round(images_per_sec, 1)))
    try:
        if grid is not None:
            save_grid(grid, run.out / f"samples_epoch{run.epoch:03d}.png", math.isqrt(len(grid)))
            write_gif(run.out, G_ema is not None)
        write_metrics(run.history, run.out, args.loss)
        rng = {"cpu": torch.get_rng_state(), "cuda": None}
        if run.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        settings = {name: value for name, value in vars(args).items() if name != "given"}
        state = dict(script=SCRIPT, epoch=run.epoch, step=run.step, args=settings,
                     G=G.state_dict(), D=D.state_dict(), opt_g=opt_g.state_dict(),
                     opt_d=opt_d.state_dict(), rng=rng, history=run.history)
        if G_ema is not None:
            state["G_ema"] = G_ema.state_dict()
        with write_atomically(run.out / "checkpoint.pt") as f:
            torch.save(state, f)
    except OSError as error:  # a full disk, a folder gone read-only: the last checkpoint is whole
        run.epoch -= 1
        fail(f"cannot write to {run.out} ({error.strerror or error}); {how_to_continue(run)}")
    w_text = f"  W {w:.4f}" if wgan else ""
    print(f"epoch {run.epoch}/{args.epochs}  D {d:.4f}  G {g:.4f}{w_text}  {seconds:.1f} s  "
          f"{images_per_sec:.0f} img/s", flush=True)
    if run.signals:  # the signal came while saving: this epoch is whole on disk
        name = signal.Signals(run.signals[0]).name
        more = ""
        if run.epoch >= args.epochs:
            more = f" --epochs {run.epoch + 1}"
        print(f"interrupted by {name} while saving epoch {run.epoch}/{args.epochs}; "
              f"{how_to_continue(run, more)}", file=sys.stderr)
        sys.exit(128 + run.signals[0])


def how_to_continue(run, flags=""):
    """For every message that stops a run: the epoch safe on disk, and the command that goes on."""
    if run.epoch == 0:
        return ("nothing was saved yet (the first checkpoint is written after epoch 1); run the "
                "same command again" + (f" with{flags}" if flags else ""))
    checkpoint = run.out / "checkpoint.pt"
    command = resume_command(checkpoint, flags)
    return f"epoch {run.epoch} is saved in {checkpoint}; continue with: {command}"


def resume_command(checkpoint, flags=""):
    """The command that continues the run whose checkpoint this is, with any flags to change."""
    return f"python {os.path.relpath(__file__)} --resume {checkpoint}{flags}"


def output_folder(args):
    """The folder a training run writes to, and its lock: --out, else the resumed run's folder,
    else the first free one of runs/<name>, runs/<name>-2, ..."""
    if args.out:
        return claim_folder(Path(args.out), args)
    if args.resume:
        return claim_folder(Path(args.resume).parent, args)
    return first_free_folder(Path("runs", args.name))


def generate_folder(args, checkpoint):
    """Where --generate writes: --out; beside a run's own checkpoint; or, for a file with G alone (a
    pretrained one), the first free runs/<name>-generated, ... (its own folder is left as it is)."""
    if args.out:
        out = Path(args.out)
    elif "opt_d" in checkpoint:
        out = Path(args.resume).parent
    else:
        return first_free_folder(Path("runs", f"{args.name}-generated"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot write to {out} ({error.strerror}); choose another --out")
    return out, None


def first_free_folder(base):
    """The first of base, base-2, base-3, ... that holds no other run's files, locked."""
    for number in range(1, 10**6):
        out = base
        if number > 1:
            out = Path(f"{base}-{number}")
        if out.is_dir() and {path.name for path in out.iterdir()} - {".lock", ".pid"}:
            continue  # another run's files
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = FileLock(out / ".lock")
            lock.acquire(timeout=0)  # the OS frees it however the process ends
        except Timeout:  # a live run holds it, saved or not yet
            continue
        except OSError as error:
            fail(f"cannot write to {out} ({error.strerror})")
        write_pid(out)
        return out, lock


def claim_folder(out, args):
    """Lock out for this run; refuse, in one line, a folder in use or one that holds another run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(out / ".lock")
        lock.acquire(timeout=0)
    except Timeout:
        holder = "unknown"
        if (out / ".pid").exists():
            holder = (out / ".pid").read_text()
        fail(f"{out} is in use by another run (process {holder}): wait for it, or choose another "
             f"--out")
    except OSError as error:
        reason = error.strerror
        if out.is_file():
            reason = "a file, not a folder"
        fail(f"cannot write to {out} ({reason}); choose another --out")
    existing = out / "checkpoint.pt"
    resuming_it = args.resume and existing.is_file() and existing.samefile(args.resume)
    if existing.is_file() and not resuming_it:
        lock.release()  # refused: the folder stays free for its own run's --resume
        epoch = load_checkpoint(existing, training=False).get("epoch", 0)
        command = resume_command(existing, f" --epochs {max(args.epochs, epoch + 1)}")
        fail(f"{out} holds a run: epoch {epoch} is saved in {existing}; continue with: "
             f"{command}; or choose another --out")
    write_pid(out)
    return out, lock


def write_pid(out):
    with write_atomically(out / ".pid") as f:  # names the holder to a run that is refused
        f.write(str(os.getpid()).encode())


def pick_device(name):
    """auto: CUDA, else MPS (Apple's GPUs), else the CPU."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        name = next(device for device, ok in available.items() if ok)
    if not available[name]:
        fail(f"--device {name} is not available; try --device cpu")
    return torch.device(name)


DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fetch_fashion_mnist(root, train=True, debian_dir=None):
    """The paths of the images file and the labels file in root/FashionMNIST/raw/, filled on the
    first run from Debian's package (gzipped: each file unpacked whole or not at all), or online."""
    from torchvision.datasets.mnist import FashionMNIST
    raw = Path(root) / "FashionMNIST" / "raw"
    try:
        for name in FILES:
            packed = Path(debian_dir or DEBIAN_DIR, name + ".gz")
            if packed.exists() and not (raw / name).exists():
                raw.mkdir(parents=True, exist_ok=True)
                with write_atomically(raw / name) as f:
                    f.write(gzip.decompress(packed.read_bytes()))
        if not all((raw / name).exists() for name in FILES):
            FashionMNIST(root, download=True)  # online: torchvision writes the four files into raw/
    except Exception as error:  # offline, or a damaged package
        fail(f"cannot get Fashion-MNIST into {raw} ({type(error).__name__}: {error}); offline, "
             f"run 'sudo apt-get install dataset-fashion-mnist' or put the four *-ubyte files in "
             f"{raw}/")
    if train:
        return raw / FILES[0], raw / FILES[1]
    return raw / FILES[2], raw / FILES[3]


def read_idx(path):
    """The tensor in an idx file (the format of the MNIST files)."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    try:
        return read_sn3_pascalvincent_tensor(str(path))
    except Exception:  # truncated, or not an idx file at all
        fail(f"{path} is damaged (truncated, or not an idx file); delete it and run again to "
             f"unpack it anew from Debian's package or download it")


@contextlib.contextmanager
def write_atomically(path):
    """`with write_atomically(path) as f:` writes a temporary file beside path, renamed to path once
    whole: a crash or a full disk never leaves half a file. The temporary's name is this process's
    own, so runs that write one file at the same moment (the data, unpacked) never share it."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            yield f
        os.replace(temporary, path)
    except RuntimeError as error:  # torch.save reports a full disk as a RuntimeError
        if isinstance(error.__context__, OSError):
            raise error.__context__
        raise
    finally:
        temporary.unlink(missing_ok=True)


def save_grid(images, path, nrow=8):
    with write_atomically(path) as f:
        save_image(images.float() / 255, f, format="png", nrow=nrow, padding=2)


def write_gif(out, averaged=False):
    """progress.gif: the fixed-noise grids so far, in epoch order, each captioned, looping."""
    from PIL import Image, ImageDraw
    frames = []
    for path in sorted(out.glob("samples_epoch*.png"), key=grid_epoch):
        caption = f"epoch {grid_epoch(path)}"
        if averaged:
            caption += ", the average of G (--ema)"
        grey = Image.open(path).convert("L")
        columns, rows = grey.size
        frame = Image.new("L", (columns, rows + 16))  # the grid under a black strip for its caption
        frame.paste(grey.point([value & 0xF8 for value in range(256)]), (0, 16))  # 32 greys: small
        ImageDraw.Draw(frame).text((4, 3), caption, fill=255)
        frames.append(frame)
    durations = [400] * (len(frames) - 1) + [2000]  # rests on the last grid
    with write_atomically(out / "progress.gif") as f:
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                       duration=durations)


def grid_epoch(path):
    return int(path.stem.removeprefix("samples_epoch"))  # samples_epoch005.png: 5


def write_metrics(history, out, loss):
    """metrics.csv, and losses.png: D's and G's losses, and for a WGAN W's estimate on its own."""
    from matplotlib.figure import Figure  # drawn into a file, never shown (plt.show() blocks)
    from matplotlib.ticker import MaxNLocator
    lines = [",".join(history[0])]
    for row in history:
        lines.append(",".join(str(value) for value in row.values()))
    with write_atomically(out / "metrics.csv") as f:
        f.write(("\n".join(lines) + "\n").encode())
    wgan = loss in ("wgan", "wgan-gp")
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(6, 6.2 if wgan else 3.8), layout="tight")
    panels = figure.subplots(2 if wgan else 1, 1, sharex=True, squeeze=False)[:, 0]
    panels[0].plot(epochs, [row["d_loss"] for row in history], "o-", ms=3, label="D loss")
    panels[0].plot(epochs, [row["g_loss"] for row in history], "o-", ms=3, label="G loss")
    panels[0].set(ylabel="mean over the epoch", title=f"{loss}: losses")
    panels[0].legend()
    if wgan:  # the number to read for a WGAN (tutorial 4.4): its own axis, so its fall shows
        estimate = [row["wasserstein_estimate"] for row in history]
        panels[1].plot(epochs, estimate, "o-", ms=3, color="C2")
        panels[1].set(ylabel="mean D(real) - mean D(fake)", title="W estimate")
    panels[-1].set(xlabel="epoch")
    panels[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    with write_atomically(out / "losses.png") as f:
        figure.savefig(f, format="png", dpi=100)


if __name__ == "__main__":
    main()
