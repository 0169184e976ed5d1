"""The tutorial's experiment table, measured: 3 architectures x 4 losses, trained, evaluated, drawn.

    python experiments.py                                 # on a GPU: the tutorial's width 128, 50 epochs
    python experiments.py --conv-width 32 --conv-epochs 10  # what fits on a 2-core CPU (the README's table)

Trains every (architecture, loss) cell with the scripts' defaults into runs/table/ (a finished cell is
skipped, a partial one resumed), scores each final checkpoint with evaluate.py, and writes
runs/table/table.md (the README's table), samples.png (the fixed-noise grid of every cell) and
losses.png (every cell's loss curves).
"""
import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ARCHS = {"FC G / FC D (a)": ("gan_fc.py",), "conv G / FC D (b)": ("gan_conv.py", "--disc", "fc"),
         "conv G / conv D (c)": ("gan_conv.py",)}
LOSSES = ("bce", "lsgan", "wgan", "wgan-gp")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fc-epochs", type=int, default=50)
    p.add_argument("--conv-epochs", type=int, default=50)
    p.add_argument("--conv-width", type=int, default=128)
    p.add_argument("--out", default="runs/table")
    p.add_argument("--only", nargs="*", help="run only these cells, e.g. fc_wgan conv_bce convG-fcD_lsgan")
    p.add_argument("--skip-training", action="store_true", help="only evaluate and draw what is there")
    args = p.parse_args()
    out = Path(args.out)
    cells = make_cells(out, args.fc_epochs, args.conv_epochs, args.conv_width)
    for (arch, loss), (name, folder, epochs, cmd) in cells.items():
        if args.skip_training or (args.only and name not in args.only):
            continue
        ckpt = folder / "checkpoint.pt"
        done = torch.load(ckpt, weights_only=True)["epoch"] if ckpt.exists() else 0
        if done < epochs:
            resume = ["--resume", str(ckpt)] if done else []
            subprocess.run(cmd + ["--epochs", str(epochs), "--out", str(folder)] + resume, check=True)
    present = {k: v for k, v in cells.items() if (v[1] / "checkpoint.pt").exists()}
    results = out / "results.csv"
    results.unlink(missing_ok=True)
    subprocess.run([sys.executable, "evaluate.py", "--floor", "--results", str(results)]
                   + [str(v[1] / "checkpoint.pt") for v in present.values()], check=True)
    rows = {r["what"]: r for r in csv.DictReader(open(results))}
    write_table(out, cells, rows)
    draw(out, present)


def make_cells(out, fc_epochs, conv_epochs, conv_width):
    """{(architecture, loss): (name, folder, epochs, command)} for every cell of the table."""
    cells = {}
    for arch, cmd in ARCHS.items():
        for loss in LOSSES:
            name = {"gan_fc.py": "fc"}.get(cmd[0], "conv" if len(cmd) == 1 else "convG-fcD") + f"_{loss}"
            fc = cmd[0] == "gan_fc.py"
            flags = [] if fc else ["--width", str(conv_width)]
            cells[(arch, loss)] = (name, out / name, fc_epochs if fc else conv_epochs,
                                   [sys.executable, *cmd, "--loss", loss, *flags])
    return cells


def write_table(out, cells, rows):
    lines = ["| architecture | " + " | ".join(LOSSES) + " |", "|---" * (len(LOSSES) + 1) + "|"]
    for arch in ARCHS:
        cols = []
        for loss in LOSSES:
            name, folder, epochs, _ = cells[(arch, loss)]
            r = rows.get(str(folder / "checkpoint.pt"))
            if r is None:
                cols.append("not run")
                continue
            ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
            # The median epoch: one slowed by another job on the machine does not move it.
            secs = statistics.median(h["seconds"] for h in ckpt["history"])
            width = "" if "fc_" == name[:3] else f", w{ckpt['args']['width']}"
            cols.append(f"**{float(r['fid_fmnist']):.1f}**, {r['classes_covered']}/10 "
                        f"({r['epoch']} ep{width}, {secs:.0f} s/ep)")
        lines.append(f"| {arch} | " + " | ".join(cols) + " |")
    for r in rows.values():
        if r["what"].startswith(("floor", "noise")):
            lines.append(f"| {r['what']} | **{float(r['fid_fmnist']):.1f}**, {r['classes_covered']}/10 |||")
    lines += ["", f"Trained and timed on {device_name()}; s/ep is the median seconds per epoch."]
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
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
            folder = present[(arch, loss)][1]
            grids = sorted(folder.glob("samples_epoch*.png"))
            ax_s[i, j].imshow(Image.open(grids[-1]).crop((0, 0, 122, 122)), cmap="gray")  # 4x4 of the 8x8
            hist = list(csv.DictReader(open(folder / "metrics.csv")))  # small, unlike the checkpoint
            epochs = [int(h["epoch"]) for h in hist]
            ax_l[i, j].plot(epochs, [float(h["d_loss"]) for h in hist], label="D")
            ax_l[i, j].plot(epochs, [float(h["g_loss"]) for h in hist], label="G")
            ax_l[i, j].tick_params(labelsize=7)
            ax_l[i, j].legend(fontsize=7)
    fig_s.tight_layout()
    fig_s.savefig(out / "samples.png", dpi=80)
    fig_l.tight_layout()
    fig_l.savefig(out / "losses.png", dpi=80)
    # Small files for the README: the sample figure is all grey, the loss figure has a few colours.
    Image.open(out / "samples.png").convert("L").save(out / "samples.png", optimize=True)
    Image.open(out / "losses.png").convert("RGB").quantize(64).save(out / "losses.png", optimize=True)
    print(f"wrote {out / 'table.md'}, {out / 'samples.png'} and {out / 'losses.png'}")


if __name__ == "__main__":
    main()
