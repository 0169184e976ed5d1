"""Speed: this project's training step against the tutorial's own loop, on one device, in one run.

    python bench.py --device cpu                          # gan_fc.py, BCE: tutorial vs fp32 vs --amp, and levers
    python bench.py --device cuda --arch conv             # gan_conv.py, experiment (c)
    python bench.py --device cuda --arch conv --loss wgan-gp   # the main job's step
    python bench.py --device cuda --arch convG-fcD        # gan_conv.py --disc fc, experiment (b)
    python bench.py --tutorial-epochs 10                  # train the tutorial's loop itself, to compare

Both sides train the same architecture. The tutorial's side is its loop as printed (section 2.2): a
DataLoader with per-image ToTensor + Normalize, D ending in Sigmoid + BCELoss, noise made on the CPU and
copied, G run twice per step, and D's weight gradients computed in the G step. This project's side
imports the scripts' own models, d_step, g_step and optimizers. The sides alternate in rounds after a
warm-up, so both see the same machine state. Prints ms per step (one D step, plus a G step every
n_critic steps: every step for BCE), images per second, the ratio, and on CUDA the peak memory
(torch.cuda.max_memory_allocated).

The usual GPU levers, each timed alone on top of this project's fp32 step ("one at a time"), then all
of them with --amp: torch.compile of G and D (the gradient penalty goes through the plain critic,
since compile has no double backward), channels_last memory for the conv models, TF32 matmuls
(torch.set_float32_matmul_precision("high")), and torch.backends.cudnn.benchmark. On a CPU the same
rows run (cudnn.benchmark and, mostly, TF32 then change nothing), so they are tested without a GPU.
"""
import argparse
import itertools
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import gan_conv
import gan_fc

LEVERS = ("compile", "channels_last", "tf32", "cudnn_benchmark")  # the usual GPU levers, timed one at a time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--arch", choices=("fc", "conv", "convG-fcD"), default="fc",
                   help="fc: gan_fc.py; conv: gan_conv.py; convG-fcD: gan_conv.py --disc fc (default: fc)")
    p.add_argument("--loss", choices=("bce", "lsgan", "wgan", "wgan-gp"), default="bce",
                   help="this project's loss; the tutorial's side is always its BCE loop (default: bce)")
    p.add_argument("--width", type=int, default=128, help="conv width (default: 128, the tutorial's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed steps per side per round (default: 40)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per side first (default: 10)")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--no-amp", action="store_true", help="skip the --amp row")
    p.add_argument("--levers", nargs="*", choices=LEVERS, default=list(LEVERS),
                   help="levers to time one at a time, and together with --amp (default: all; none: no lever rows)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (default: inductor; "
                   "the tests use aot_eager, which compiles in seconds)")
    p.add_argument("--tutorial-epochs", type=int, help="instead of timing: train the tutorial's loop for N epochs "
                   "and write its samples and a checkpoint that evaluate.py reads into --out")
    p.add_argument("--out", help="for --tutorial-epochs (default: the first free one of runs/tutorial_fc, "
                   "runs/tutorial_fc-2, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of both sides' weights and data order (default: 0)")
    p.error = lambda message: sys.exit(f"error: {message}")
    args = p.parse_args(argv)
    args.device = gan_fc.pick_device(args.device)
    if args.arch == "fc" and "channels_last" in args.levers:
        args.levers.remove("channels_last")  # a memory format for 4-d conv activations; the FC GAN has none
    return args


def script_args(args, amp):
    module = gan_fc if args.arch == "fc" else gan_conv
    argv = ["--loss", args.loss, "--batch-size", str(args.batch_size)] + (["--amp"] if amp else [])
    if args.arch != "fc":
        argv += ["--width", str(args.width), "--disc", "conv" if args.arch == "conv" else "fc"]
    return module, module.parse_args(argv)


def images(args):
    """Real Fashion-MNIST (uint8) when present, else random images of the same size."""
    try:
        return gan_fc.load_fashion_mnist(args.data_root)[0]
    except SystemExit:
        print("(Fashion-MNIST not found: timing on random 28x28 images, same per-image transforms)")
        return torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8)


def tutorial_side(args, data):
    """The tutorial's loop (section 2.2), one step per call. Its G and D are ours, plus D's final Sigmoid."""
    from PIL import Image
    import torchvision.transforms as transforms
    device = args.device
    module, a = script_args(args, amp=False)
    a.loss, a.seed = "bce", args.seed  # the tutorial's models whatever --loss says: Dropout(0.3), BatchNorm in D
    torch.manual_seed(args.seed)
    generator, discriminator = module.build_models(a)
    generator, discriminator = generator.to(device), nn.Sequential(discriminator, nn.Sigmoid()).to(device)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])

    class Dataset(torch.utils.data.Dataset):  # what torchvision's FashionMNIST does per image
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return transform(Image.fromarray(data[i, 0].numpy(), mode="L")), 0
    train_loader = torch.utils.data.DataLoader(Dataset(), batch_size=args.batch_size, shuffle=True)
    batches = itertools.chain.from_iterable(itertools.repeat(train_loader))
    optimizer_G = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizer_D = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    criterion = nn.BCELoss()

    def step():
        torch.set_float32_matmul_precision("highest")  # PyTorch's defaults, whatever a lever side set
        torch.backends.cudnn.benchmark = False
        real_imgs, _ = next(batches)
        batch_size = real_imgs.size(0)
        real_labels = torch.ones(batch_size, 1).to(device)
        fake_labels = torch.zeros(batch_size, 1).to(device)
        real_imgs = real_imgs.to(device)
        z = torch.randn(batch_size, a.latent_dim).to(device)
        fake_imgs = generator(z).detach()
        d_loss = criterion(discriminator(real_imgs), real_labels) + criterion(discriminator(fake_imgs), fake_labels)
        optimizer_D.zero_grad()
        d_loss.backward()
        optimizer_D.step()
        z = torch.randn(batch_size, a.latent_dim).to(device)
        fake_imgs = generator(z)
        g_loss = criterion(discriminator(fake_imgs), real_labels)
        optimizer_G.zero_grad()
        g_loss.backward()
        optimizer_G.step()
    step.generator, step.args, step.batches_per_epoch = generator, a, len(train_loader)
    return step


class CompiledCritic(nn.Module):
    """D compiled for its scores, and plain for the gradient penalty, whose double backward torch.compile
    lacks (pytorch issue 91469). The penalty's call is the one whose input is a leaf that requires a gradient
    (the interpolates); the G step's fakes require one too, but come out of G."""
    def __init__(self, critic, backend):
        super().__init__()
        self.plain = critic
        self.compiled = torch.compile(critic, backend=backend)  # shares the plain module's weights

    def forward(self, x, labels=None):
        if x.is_leaf and x.requires_grad:
            return self.plain(x, labels)
        return self.compiled(x, labels)


def project_side(args, data, amp, levers=()):
    """The scripts' loop body: resident uint8 data, one G forward, d_step and g_step as imported; with levers."""
    device = args.device
    module, a = script_args(args, amp)
    torch.manual_seed(args.seed)
    G, D = (m.to(device) for m in module.build_models(a))
    opt_g, opt_d = module.make_optimizers(G, D, a, device)
    memory = torch.channels_last if "channels_last" in levers else torch.contiguous_format
    G, D = G.to(memory_format=memory), D.to(memory_format=memory)
    if "compile" in levers:  # compiled modules share the plain ones' weights
        G, D = torch.compile(G, backend=args.compile_backend), CompiledCritic(D, args.compile_backend)
    data = data.to(device)
    B, state = a.batch_size, {"step": 0, "perm": torch.randperm(len(data), device=device), "i": 0}
    precision, benchmark = ("high" if "tf32" in levers else "highest"), "cudnn_benchmark" in levers

    def step():
        torch.set_float32_matmul_precision(precision)  # global switches, so set for this side's every step
        torch.backends.cudnn.benchmark = benchmark
        if (state["i"] + 1) * B > len(data):
            state["perm"], state["i"] = torch.randperm(len(data), device=device), 0
        real = data[state["perm"][state["i"] * B:(state["i"] + 1) * B]].float() / 127.5 - 1  # as the scripts do
        real = real.contiguous(memory_format=memory)
        z = torch.randn(B, a.latent_dim, device=device)
        g_turn = (state["step"] + 1) % a.n_critic == 0
        with torch.set_grad_enabled(g_turn), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            fake = G(z)
        module.d_step(D, opt_d, real, fake, a.loss, a.gp_weight, a.clip, amp)
        if g_turn:
            module.g_step(D, opt_g, fake, a.loss, amp)
        state["step"] += 1
        state["i"] += 1
    return step


def train_tutorial(args, data):
    """The tutorial's loop for --tutorial-epochs epochs; grids from the scripts' fixed noise, so they compare."""
    out = Path(args.out) if args.out else next(p for p in (Path(f"runs/tutorial_fc-{k}") if k > 1 else Path(
        "runs/tutorial_fc") for k in itertools.count(1)) if not p.exists() or not any(p.iterdir()))
    if (out / "checkpoint.pt").exists():  # as the scripts: a fresh run never overwrites another run's files
        sys.exit(f"error: {out} already holds a run (checkpoint.pt); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    print(f"the tutorial's loop: writing to {out}")
    module, _ = script_args(args, amp=False)
    step = tutorial_side(args, data)
    fixed_z = torch.randn(64, step.args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    history = []
    for epoch in range(1, args.tutorial_epochs + 1):
        t0 = time.perf_counter()
        for _ in range(step.batches_per_epoch):
            step()
        sync(args.device)
        history.append({"epoch": epoch, "seconds": round(time.perf_counter() - t0, 2)})
        print(f"tutorial's loop: epoch {epoch}/{args.tutorial_epochs}  {history[-1]['seconds']:.1f} s", flush=True)
        module.save_grid(module.sample(step.generator, fixed_z), out / f"samples_epoch{epoch:03d}.png")
    state = dict(script=module.SCRIPT, epoch=args.tutorial_epochs, args=vars(step.args), G=step.generator.state_dict(),
                 history=history)
    with module.write_atomically(out / "checkpoint.pt") as f:
        torch.save(state, f)
    print(f"wrote {out}/checkpoint.pt: python evaluate.py {out}/checkpoint.pt")


LEVER_NAMES = {"compile": "torch.compile", "channels_last": "channels_last", "tf32": "TF32 matmuls",
               "cudnn_benchmark": "cudnn.benchmark"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    data = images(args)
    if args.tutorial_epochs:
        return train_tutorial(args, data)
    sides = {"tutorial's loop": lambda: tutorial_side(args, data),
             "this project": lambda: project_side(args, data, amp=False)}
    if not args.no_amp:
        sides["this project --amp"] = lambda: project_side(args, data, amp=True)
    for lever in args.levers:
        sides[f"+ {LEVER_NAMES[lever]}"] = lambda lever=lever: project_side(args, data, amp=False, levers=(lever,))
    if args.levers:
        sides["--amp + those levers"] = lambda: project_side(args, data, amp=True, levers=args.levers)
    steps, peak = {}, {}
    for name, make in sides.items():  # build and warm up each side alone, to read its own peak memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        steps[name] = make()
        for _ in range(args.warmup):
            steps[name]()
        sync(device)
        peak[name] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    seconds = dict.fromkeys(sides, 0.0)
    for _ in range(args.rounds):  # interleaved: each round times every side once
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            seconds[name] += time.perf_counter() - t0
    n = args.rounds * args.steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device.type} ({name}), torch {torch.__version__}; arch {args.arch}"
          f"{'' if args.arch == 'fc' else f' width {args.width}'}, loss {args.loss}, batch {args.batch_size}, "
          f"{n} steps per side in {args.rounds} interleaved rounds")
    base = seconds["tutorial's loop"]
    own = seconds["this project"]
    print(f"{'':22}{'ms/step':>10}{'images/s':>11}{'speed-up':>10}{'vs fp32':>9}{'peak MB':>10}")
    for name in sides:
        ms = 1000 * seconds[name] / n
        mem = f"{peak[name]:.0f}" if peak[name] is not None else "-"
        print(f"{name:22}{ms:10.1f}{args.batch_size / ms * 1000:11.0f}{base / seconds[name]:9.2f}x"
              f"{own / seconds[name]:8.2f}x{mem:>10}")
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    sys.exit(main())
