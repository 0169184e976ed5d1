"""The tutorial's experiment table, measured: 3 architectures x 4 losses, trained, evaluated, drawn.

    python experiments.py                                 # on a GPU: the tutorial's width 128, 50 epochs
    python experiments.py --conv-width 32 --conv-epochs 10  # what fits on a 2-core CPU (docs/experiments.md)
    python experiments.py --seeds 0 1 2 --only fc_bce fc_lsgan  # three seeds a cell: median [min-max]
    python experiments.py --seeds 0 1 2 --tutorial-epochs 10 --only tutorial_10ep fc_bce_10ep

Trains every (architecture, loss) cell with the scripts' defaults into runs/table/, once per seed (a
finished run is skipped, a partial one resumed), scores each final checkpoint with evaluate.py (once:
scores are kept in runs/table/results.csv), and writes runs/table/table.md (the table of docs/experiments.md),
samples.png (the fixed-noise grid of every cell, lowest seed) and losses.png (its loss curves).
GAN training is noisy: Lucic et al. 2018 (arXiv 1711.10337) compare losses over seeds, so does this.
"""
import argparse
import copy
import csv
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from filelock import FileLock, Timeout  # installed with PyTorch

import evaluate as scorer  # evaluate.py, called in this process: no second start of PyTorch
import gan_conv
import gan_fc

SCRIPTS = {"gan_fc.py": gan_fc, "gan_conv.py": gan_conv}  # their runs train in this process too

ARCHS = {"FC G / FC D (a)": ("gan_fc.py",), "conv G / FC D (b)": ("gan_conv.py", "--disc", "fc"),
         "conv G / conv D (c)": ("gan_conv.py",)}
LOSSES = ("bce", "lsgan", "wgan", "wgan-gp")
COMPARISON = "the tutorial's loop beside gan_fc.py"  # the FC GAN with BCE, the same epochs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fc-epochs", type=int, default=50)
    p.add_argument("--conv-epochs", type=int, default=50)
    p.add_argument("--conv-width", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train every cell once per seed; the "
                   "table shows the median FID and the [min-max] range (default: 0)")
    p.add_argument("--tutorial-epochs", type=int, help="also the 10-epoch comparison: the tutorial's own loop "
                   "(bench.py --tutorial-epochs N) beside gan_fc.py --epochs N, once per seed")
    p.add_argument("--out", default="runs/table")
    p.add_argument("--only", nargs="*", help="run only these cells, e.g. fc_wgan conv_bce convG-fcD_lsgan")
    p.add_argument("--skip-training", action="store_true", help="only evaluate and draw what is there")
    p.add_argument("--data-root", help="where FashionMNIST/ is, for every run and evaluate.py (default: ./data)")
    p.add_argument("--train-images", type=int, help="train on the first N images only, for a quick check")
    p.add_argument("--samples", type=int, default=10000, help="evaluate.py's samples per checkpoint (default: 10000)")
    p.add_argument("--ema-tries", choices=EMA_RUNS, help="instead of the table: train EMA_RUNS' run into --out "
                   "with several averages of G side by side (docs/experiments.md)")
    p.error = lambda message: sys.exit(f"error: {message}")
    args = p.parse_args(argv)
    if min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds must be distinct and not negative, got {' '.join(map(str, args.seeds))}")
    out = Path(args.out)
    if args.ema_tries:
        data = ["--data-root", args.data_root] if args.data_root else []
        if not args.skip_training:
            ema_tries(args.ema_tries, out, data)
        score_ema_tries(out, args.samples, args.data_root)
        return
    cells = make_cells(out, args.fc_epochs, args.conv_epochs, args.conv_width, args.seeds, args.tutorial_epochs)
    data = ["--data-root", args.data_root] if args.data_root else []
    flags = data + (["--train-images", str(args.train_images)] if args.train_images else [])
    elsewhere = []  # runs that another process is training as we go
    try:
        for seed in args.seeds:  # every cell at one seed before the next seed, so a stopped run leaves whole rows
            for name, folders, epochs, cmd in cells.values():
                if not (args.skip_training or (args.only and name not in args.only)):
                    extra = data if "bench.py" in cmd[1] else flags  # bench.py's tutorial loop trains on all images
                    if not train(folders[seed], epochs, cmd + extra + ["--seed", str(seed)]):
                        elsewhere.append((folders[seed], epochs))
    except (KeyboardInterrupt, SystemExit, subprocess.CalledProcessError) as e:  # the run has said why
        if isinstance(e, KeyboardInterrupt):
            code = 130
        elif isinstance(e, subprocess.CalledProcessError):  # bench.py's process
            code = e.returncode
        elif isinstance(e.code, int):  # a script's main(), stopped by a signal: 130 or 143
            code = e.code
        else:  # a script's main() failed: its one error line, which Python prints at an exit
            print(e.code, file=sys.stderr)
            code = 1
        print("experiments.py stopped; the same command continues: finished runs are skipped, the stopped one "
              "resumes", file=sys.stderr)
        sys.exit(code)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(out / ".table.lock"):  # one process at a time scores and writes the table
        rows = evaluate(out, [f / "checkpoint.pt" for c in cells.values() for f in c[1].values()
                              if (f / "checkpoint.pt").exists()], data + ["--samples", str(args.samples)])
        write_table(out, cells, rows)
        draw(out, {k: first_seed(c[1]) for k, c in cells.items() if k[0] in ARCHS and first_seed(c[1])})
    still = [folder for folder, epochs in elsewhere if epochs_done(folder) < epochs]
    if still:  # still training in another process as the table was written
        print(f"{len(still)} run(s) still training in another process ({', '.join(map(str, still))}): the "
              f"table has what had finished; the process that finishes last writes it whole")


def make_cells(out, fc_epochs, conv_epochs, conv_width, seeds=(0,), tutorial_epochs=None):
    """{(row, column): (name, {seed: folder}, epochs, command)}: the table's 12 cells, and with tutorial_epochs
    the comparison's two. Seed 0 trains into out/<name>/ (as before seeds existed), seed s into out/<name>_seed<s>/."""
    cells = {}
    for arch, cmd in ARCHS.items():
        for loss in LOSSES:
            name = {"gan_fc.py": "fc"}.get(cmd[0], "conv" if len(cmd) == 1 else "convG-fcD") + f"_{loss}"
            fc = cmd[0] == "gan_fc.py"
            flags = [] if fc else ["--width", str(conv_width)]
            epochs = fc_epochs if fc else conv_epochs
            cells[(arch, loss)] = (name, {}, epochs, [sys.executable, *cmd, "--loss", loss, *flags, "--epochs", str(epochs)])
    if tutorial_epochs:
        n = tutorial_epochs
        cells[(COMPARISON, "tutorial")] = (f"tutorial_{n}ep", {}, n, [sys.executable, "bench.py", "--tutorial-epochs", str(n)])
        cells[(COMPARISON, "gan_fc")] = (f"fc_bce_{n}ep", {}, n, [sys.executable, "gan_fc.py", "--epochs", str(n)])
    for name, folders, _, _ in cells.values():
        folders.update({s: out / (name if s == 0 else f"{name}_seed{s}") for s in seeds})
    return cells


def first_seed(folders):
    """The folder of the lowest seed that ran: the one the figures show."""
    return next((folders[s] for s in sorted(folders) if (folders[s] / "checkpoint.pt").exists()), None)


def load(checkpoint):
    """A checkpoint, memory-mapped onto the CPU: fast to open, and one written on a GPU opens anywhere."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)


def epochs_done(folder):
    """How many epochs the run in folder has saved (0 before its first checkpoint)."""
    return load(folder / "checkpoint.pt")["epoch"] if (folder / "checkpoint.pt").exists() else 0


def claim(path):
    """A lock on path held by this process, or None if another process holds it. The OS frees a lock however
    its process ends, so a killed experiments.py leaves no stale claim."""
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
        return lock
    except Timeout:
        return None


def train(folder, epochs, cmd):
    """Train one run to `epochs`: skipped when done, resumed when partial. False, and left alone, while another
    process trains it: another experiments.py on the same table (its claim on the run), or a script itself."""
    folder.mkdir(parents=True, exist_ok=True)
    mine = claim(folder.parent / f".{folder.name}.lock")
    if mine is None or (script := claim(folder / ".lock")) is None:  # the script's own lock: it is training
        if mine:
            mine.release()
        print(f"{folder}: in use by another process, which trains it; skipped", flush=True)
        return False
    script.release()  # the script takes it itself, while this process keeps its claim on the run
    try:
        done = epochs_done(folder)
        if done < epochs:
            resume = ["--resume", str(folder / "checkpoint.pt")] if done else []
            run_command(cmd + ["--out", str(folder)] + resume)
        return True
    finally:
        mine.release()


def run_command(cmd):
    """A cell's command: gan_fc.py's or gan_conv.py's main() in this process (PyTorch starts once, not
    once a run), bench.py's tutorial loop as a process of its own."""
    script = SCRIPTS.get(cmd[1])
    if script is None:
        subprocess.run(cmd, check=True)
    else:
        script.main(cmd[2:])


def evaluate(out, checkpoints, flags=()):
    """evaluate.py's rows {what: row} for every checkpoint; only checkpoints without a row at their epoch are scored."""
    results = out / "results.csv"
    rows = read_results(results)
    stale = [str(c) for c in checkpoints
             if rows.get(str(c), {}).get("epoch") != str(load(c)["epoch"])]
    floor = [] if any(w.startswith("floor") for w in rows) else ["--floor"]
    if stale or floor:
        scorer.main([*flags, *floor, "--results", str(results), *stale])
    return read_results(results)


def read_results(path):
    return {r["what"]: r for r in csv.DictReader(open(path))} if path.exists() else {}  # a later row wins


def cell_text(folders, rows, width=False):
    """'**median** [min-max], fewest classes covered/10 (epochs, width, s/ep, seeds)' from every seed that ran."""
    runs = [(f, rows[str(f / "checkpoint.pt")]) for f in folders.values() if str(f / "checkpoint.pt") in rows]
    if not runs:
        return "not run"
    fids = [float(r["fid_fmnist"]) for _, r in runs]
    ckpts = [load(f / "checkpoint.pt") for f, _ in runs]
    secs = statistics.median(h["seconds"] for c in ckpts for h in c["history"])  # a slowed epoch does not move it
    epochs = sorted({int(r["epoch"]) for _, r in runs})
    spread = f" [{min(fids):.1f}-{max(fids):.1f}]" if len(runs) > 1 else ""
    width = f", w{ckpts[0]['args']['width']}" if width else ""
    return (f"**{statistics.median(fids):.1f}**{spread}, {min(int(r['classes_covered']) for _, r in runs)}/10 "
            f"({'-'.join(map(str, epochs))} ep{width}, {secs:.0f} s/ep, {len(runs)} seed{'s' * (len(runs) > 1)})")


def write_table(out, cells, rows):
    lines = ["| architecture | " + " | ".join(LOSSES) + " |", "|---" * (len(LOSSES) + 1) + "|"]
    for arch in ARCHS:
        cols = [cell_text(cells[(arch, loss)][1], rows, width=arch != "FC G / FC D (a)") for loss in LOSSES]
        lines.append(f"| {arch} | " + " | ".join(cols) + " |")
    for r in rows.values():
        if r["what"].startswith(("floor", "noise")):
            lines.append(f"| {r['what']} | **{float(r['fid_fmnist']):.1f}**, {r['classes_covered']}/10 |||")
    lines += ["", f"Trained and timed on {device_name()}. Each cell: the median FID over its seeds, [the range], "
              "the fewest classes any seed covered, then epochs, conv width, median seconds per epoch, seeds."]
    comparison = [(k[1], c) for k, c in cells.items() if k[0] == COMPARISON]
    if comparison:
        epochs = comparison[0][1][2]
        lines += ["", f"| the FC GAN, BCE, {epochs} epochs | FID, fewest classes covered (epochs, s/ep, seeds) |", "|---|---|"]
        for what, (name, folders, epochs, cmd) in comparison:
            lines.append(f"| `python {' '.join(cmd[1:])}` | {cell_text(folders, rows)} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def draw(out, present):
    """present: {(architecture, loss): the folder to draw} for the cells that ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    if not present:
        return
    archs = [a for a in ARCHS if any((a, loss) in present for loss in LOSSES)]  # rows that ran
    fig_s, ax_s = plt.subplots(len(archs), len(LOSSES), figsize=(2.6 * len(LOSSES), 2.8 * len(archs)), squeeze=False)
    fig_l, ax_l = plt.subplots(len(archs), len(LOSSES), figsize=(3.2 * len(LOSSES), 2.4 * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        for j, loss in enumerate(LOSSES):
            ax_s[i, j].axis("off")
            ax_s[i, j].set_title(f"{arch}: {loss}", fontsize=7)
            ax_l[i, j].set_title(f"{arch}, {loss}", fontsize=8)
            if (arch, loss) not in present:
                continue
            folder = present[(arch, loss)]
            grids = sorted(folder.glob("samples_epoch*.png"))  # none yet while another process trains it
            if grids:
                ax_s[i, j].imshow(Image.open(grids[-1]).crop((0, 0, 122, 122)), cmap="gray")  # 4x4 of the 8x8
            if not (folder / "metrics.csv").exists():
                continue
            hist = list(csv.DictReader(open(folder / "metrics.csv")))  # small, unlike the checkpoint
            epochs = [int(h["epoch"]) for h in hist]
            ax_l[i, j].plot(epochs, [float(h["d_loss"]) for h in hist], label="D")
            ax_l[i, j].plot(epochs, [float(h["g_loss"]) for h in hist], label="G")
            ax_l[i, j].tick_params(labelsize=7)
            ax_l[i, j].legend(fontsize=7, loc="upper left")
            if loss in ("wgan", "wgan-gp"):  # the number to read for a WGAN, on an axis of its own
                w_axis = ax_l[i, j].twinx()
                w_axis.plot(epochs, [float(h["wasserstein_estimate"]) for h in hist], color="C2", label="W")
                w_axis.tick_params(labelsize=7, colors="C2")
                w_axis.legend(fontsize=7, loc="upper right")
    fig_s.tight_layout()
    fig_s.savefig(out / "samples.png", dpi=80)
    fig_l.tight_layout()
    fig_l.savefig(out / "losses.png", dpi=80)
    # Small files for the docs: the sample figure is all grey, the loss figure has a few colours.
    Image.open(out / "samples.png").convert("L").save(out / "samples.png", optimize=True)
    Image.open(out / "losses.png").convert("RGB").quantize(64).save(out / "losses.png", optimize=True)
    print(f"wrote {out / 'table.md'}, {out / 'samples.png'} and {out / 'losses.png'}")


# ------------------------------------------------------------------------------------------------------------
# The averaged generator's tries (docs/experiments.md): one run, several averages
# ------------------------------------------------------------------------------------------------------------
EMA_RUNS = {"conv": ["gan_conv.py", "--loss", "wgan-gp", "--width", "32", "--epochs", "50", "--ema"],
            "fc": ["gan_fc.py", "--epochs", "50", "--ema"]}
EMA_OTHERS = {"0.999, no warm-up": (0.999, False), "0.9999, warm-up": (0.9999, True),
              "0.9999, no warm-up": (0.9999, False)}  # beside --ema's own: 0.999 with its warm-up
SNAPSHOTS = (5, 10, 20, 30, 40, 50)


def ema_tries(name, out, flags=()):
    """Train EMA_RUNS[name] into out/ with --ema, and keep the averages of EMA_OTHERS beside the run's own,
    each updated after the same G steps: an average never changes training, so one run gives them all. After
    every epoch out/averages/epochNNN.pt holds G, the run's average and the others (kept at SNAPSHOTS epochs
    and the last); stopped, the same command resumes."""
    script, *argv = EMA_RUNS[name]
    module = SCRIPTS[script]
    folder = out / "averages"
    folder.mkdir(parents=True, exist_ok=True)
    others = {}
    done = epochs_done(out)
    if done:
        saved = torch.load(folder / f"epoch{done:03d}.pt", weights_only=True)["others"]
        argv += ["--resume", str(out / "checkpoint.pt")]
    update_run_average = module.update_average
    end_run_epoch = module.end_epoch

    def update_every_average(G_ema, G, decay, g_steps):
        if not others:  # the first update: every average starts where the run's does
            for label in EMA_OTHERS:
                others[label] = copy.deepcopy(G_ema)
                if done:
                    others[label].load_state_dict(saved[label])
        update_run_average(G_ema, G, decay, g_steps)
        for label, (other_decay, warm_up) in EMA_OTHERS.items():
            steps = g_steps if warm_up else 10**12  # no warm-up: (1 + t) / (10 + t) is 1 at once
            update_run_average(others[label], G, other_decay, steps)

    def end_epoch(run, G, D, opt_g, opt_d, grid, G_ema=None):
        epoch = run.epoch + 1  # before the checkpoint: a resume always finds its epoch's averages
        state = {"epoch": epoch, "G": G.state_dict(), "G_ema": G_ema.state_dict(),
                 "others": {label: average.state_dict() for label, average in others.items()}}
        with module.write_atomically(folder / f"epoch{epoch:03d}.pt") as f:
            torch.save(state, f)
        for old in folder.glob("epoch*.pt"):
            old_epoch = int(old.stem.removeprefix("epoch"))
            if old_epoch < epoch - 1 and old_epoch not in SNAPSHOTS:
                old.unlink()
        end_run_epoch(run, G, D, opt_g, opt_d, grid, G_ema)

    module.update_average = update_every_average
    module.end_epoch = end_epoch
    try:
        module.main([*argv, *flags, "--out", str(out)])
    finally:
        module.update_average = update_run_average
        module.end_epoch = end_run_epoch


@torch.no_grad()
def recompute_batchnorm(G, latent_dim, batches=100, batch_size=128, seed=1):
    """BatchNorm's statistics measured anew on G's own batches ("standing statistics", as BigGAN's code offers),
    instead of averaged alongside the weights: G in train mode over `batches` batches of fresh noise, each
    statistic the plain mean over all of them (momentum None)."""
    noise = torch.Generator().manual_seed(seed)
    for module in G.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    G.train()
    for _ in range(batches):
        G(torch.randn(batch_size, latent_dim, generator=noise))
    G.eval()
    return G


def score_ema_tries(out, samples=10000, data_root=None):
    """Score every snapshot that ema_tries() kept: G, the run's average, the others, and the run's average with its
    BatchNorm statistics recomputed; rows in out/ema_tries.csv (a snapshot's generator is scored once)."""
    ckpt = load(out / "checkpoint.pt")
    module = {"gan_fc": gan_fc, "gan_conv": gan_conv}[ckpt["script"]]
    args = module.parse_args(["--loss", ckpt["args"]["loss"]])
    vars(args).update(ckpt["args"])
    rows_path = out / "ema_tries.csv"
    rows = list(csv.DictReader(open(rows_path))) if rows_path.exists() else []
    done = {(r["epoch"], r["generator"]) for r in rows}
    model = scorer.load_classifier()
    test_images = gan_fc.load_fashion_mnist(data_root or "data", train=False)[0]
    test_features = scorer.predict(model, test_images)[0]
    z = torch.randn(samples, args.latent_dim, generator=torch.Generator().manual_seed(0))
    for path in sorted((out / "averages").glob("epoch*.pt")):
        if int(path.stem.removeprefix("epoch")) not in SNAPSHOTS:
            continue  # the last epochs' files, kept for a resume: the training may delete them as we go
        state = torch.load(path, weights_only=True)
        epoch = str(state["epoch"])
        generators = {"G": state["G"], f"--ema {args.ema:g}, warm-up": state["G_ema"], **state["others"]}
        if any(name.endswith("running_mean") for name in state["G_ema"]):  # the conv G has BatchNorm, the FC G none
            generators["--ema, BatchNorm recomputed"] = state["G_ema"]
        for name, weights in generators.items():
            if (epoch, name) in done:
                continue
            G, _ = module.build_models(args)
            G.load_state_dict(weights)
            if name.endswith("recomputed"):
                recompute_batchnorm(G, args.latent_dim)
            m = scorer.evaluate_images(model, module.sample(G, z), test_features)
            rows.append({"epoch": epoch, "generator": name, "fid": f"{m['fid']:.2f}", "density": f"{m['density']:.3f}",
                         "coverage": f"{m['coverage']:.3f}", "classes": m["classes_covered"]})
            print(f"epoch {epoch:>3}  {name:32} FID {m['fid']:7.2f}  density {m['density']:.3f}  "
                  f"coverage {m['coverage']:.3f}  {m['classes_covered']}/10", flush=True)
            with open(rows_path, "w", newline="") as f:
                writer = csv.DictWriter(f, ["epoch", "generator", "fid", "density", "coverage", "classes"])
                writer.writeheader()
                writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
