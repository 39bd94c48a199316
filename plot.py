"""Curves of runs, as PNGs (matplotlib, Agg).

    python plot.py Results/<run>                  accuracy, loss, schedule and centers PNGs
                                                  in the run's folder
    python plot.py Results/<a> Results/<b> ...    one side-by-side comparison.png (--out=PATH)
    python plot.py --table Results/*              one markdown row per run

Reads what the scripts write (metrics.jsonl, config.json) and never changes it. Centralized
runs: full-precision and quantized test accuracy, training and quantized training loss, lambda
and lr2, every layer's centers with [-1, 1] marked; federated runs: the clients' personalised
accuracy (mean, min, max) and the global model's. The freeze is a vertical line.
"""
import json
import math
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100
FREEZE_STYLE = {'color': 'grey', 'linestyle': ':', 'linewidth': 1.2}


class RunError(Exception):
    """A folder that holds no run, or none with a completed epoch; the message says which."""


def read_run(folder):
    """(config, rows) of a run folder."""
    metrics = os.path.join(folder, 'metrics.jsonl')
    config = os.path.join(folder, 'config.json')
    if not os.path.isdir(folder) or not os.path.isfile(config):
        raise RunError(f"{folder} is not a run folder (no config.json): pass folders that "
                       f"main_centralized.py or main_federated.py wrote, e.g. Results/<run>.")
    with open(config) as f:
        cfg = json.load(f)
    rows = []
    if os.path.isfile(metrics):
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise RunError(f"{folder} has no completed epoch or round yet: plot it once its first "
                       f"one has ended.")
    return cfg, rows


def is_federated(rows):
    return 'round' in rows[0]


def steps(rows):
    return [row['round' if 'round' in row else 'epoch'] for row in rows]


def freeze_step(rows):
    return next((s for s, row in zip(steps(rows), rows) if row['frozen']), None)


def mark_freeze(ax, rows):
    step = freeze_step(rows)
    if step is not None:
        ax.axvline(step, **FREEZE_STYLE, label=f'freeze ({step})')


def label(ax, rows, ylabel):
    ax.set_xlabel('round' if is_federated(rows) else 'epoch')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def run_title(folder, cfg):
    if 'algorithm' in cfg:
        return (f"{os.path.basename(os.path.normpath(folder))}: {cfg['algorithm']}, "
                f"{cfg['n_clients']} clients, bits {cfg['client_bits']}")
    return (f"{os.path.basename(os.path.normpath(folder))}: resnet{cfg['resn']}, "
            f"n={cfg['n_centroids']}, center_reg_fix={cfg['center_reg_fix']}")


def plot_accuracy(ax, rows):
    x = steps(rows)
    if is_federated(rows):
        q = [[c['q_test_acc'] for c in row['clients']] for row in rows]
        ax.fill_between(x, [min(v) for v in q], [max(v) for v in q], alpha=0.2,
                        label='personalised quantized, min-max over clients')
        ax.plot(x, [row['q_test_acc_mean'] for row in rows], label='personalised quantized, mean')
        ax.plot(x, [row['fp_test_acc_mean'] for row in rows], '--',
                label='personalised full precision, mean')
        if rows[0]['global_test_acc_mean'] is not None:
            ax.plot(x, [row['global_test_acc_mean'] for row in rows], label='global model, mean')
    else:
        ax.plot(x, [row['test_acc'] for row in rows], label='full precision')
        ax.plot(x, [row['q_test_acc'] for row in rows], label='quantized')
    ax.set_ylim(0, 1)
    mark_freeze(ax, rows)
    label(ax, rows, 'test accuracy')


def plot_loss(ax, rows):
    x = steps(rows)
    if is_federated(rows):
        for key, name in (('train_loss', 'personalised'), ('global_train_loss', 'global copy')):
            values = [[c[key] for c in row['clients'] if c.get(key) is not None] for row in rows]
            if all(values):
                ax.plot(x, [sum(v) / len(v) for v in values], label=f'{name}, mean over clients')
    else:
        ax.plot(x, [row['train_loss'] for row in rows], label='training loss (full precision)')
        ax.plot(x, [row['q_train_loss'] for row in rows], label='quantized training loss')
    ax.set_yscale('log')
    mark_freeze(ax, rows)
    label(ax, rows, 'loss')


def plot_schedule(ax, rows):
    x = steps(rows)
    ax.plot(x, [row['lambda'] for row in rows], label='lambda')
    ax.plot(x, [row['lambda2'] for row in rows], '--', label='lambda2')
    mark_freeze(ax, rows)
    label(ax, rows, 'lambda')
    right = ax.twinx()
    right.plot(x, [max(row['lr2'], 1e-12) for row in rows], color='tab:red', label='lr2')
    right.set_yscale('log')
    right.set_ylabel('lr2')
    right.legend(fontsize=8, loc='lower right')


def centers_of(rows):
    """[steps][layers][n] centers: the run's, or its first quantized client's."""
    if not is_federated(rows):
        return rows[0]['centers'] and [row['centers'] for row in rows], 'centers'
    for client in range(len(rows[0]['clients'])):
        if rows[0]['clients'][client].get('centers'):
            return ([row['clients'][client]['centers'] for row in rows],
                    f'client {client}: centers')
    return None, ''


def plot_centers(fig, rows):
    """One panel per layer, one line per center, [-1, 1] marked."""
    centers, title = centers_of(rows)
    if not centers:
        return False
    x = steps(rows)
    layers = len(centers[0])
    cols = math.ceil(math.sqrt(layers * 1.6))
    axes = fig.subplots(math.ceil(layers / cols), cols, sharex=True, squeeze=False).flatten()
    for layer, ax in enumerate(axes):
        if layer >= layers:
            ax.axis('off')
            continue
        for k in range(len(centers[0][layer])):
            ax.plot(x, [c[layer][k] for c in centers], linewidth=1)
        ax.axhspan(-1, 1, color='tab:green', alpha=0.08)
        for bound in (-1, 1):
            ax.axhline(bound, color='tab:green', linewidth=0.6)
        step = freeze_step(rows)
        if step is not None:
            ax.axvline(step, **FREEZE_STYLE)
        ax.set_title(f'layer {layer}', fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f'{title} per {"round" if is_federated(rows) else "epoch"} ([-1, 1] shaded, '
                 f'freeze dotted)', fontsize=10)
    return True


def save(fig, path):
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_run(folder):
    """The run's PNGs, written into its folder; returns their paths."""
    cfg, rows = read_run(folder)
    written = []
    for name, draw in (('accuracy', plot_accuracy), ('loss', plot_loss),
                       ('schedule', plot_schedule)):
        fig, ax = plt.subplots(figsize=(8, 5), layout='constrained')
        draw(ax, rows)
        ax.set_title(run_title(folder, cfg), fontsize=10)
        written.append(save(fig, os.path.join(folder, f'{name}.png')))
    fig = plt.figure(figsize=(12, 8), layout='constrained')
    if plot_centers(fig, rows):
        written.append(save(fig, os.path.join(folder, 'centers.png')))
    else:
        plt.close(fig)
    return written


def plot_comparison(folders, out):
    """Runs side by side: accuracy on top, every layer's centers below."""
    runs = [read_run(folder) for folder in folders]
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 8), squeeze=False,
                             layout='constrained')
    for column, (folder, (cfg, rows)) in enumerate(zip(folders, runs)):
        plot_accuracy(axes[0, column], rows)
        axes[0, column].set_title(run_title(folder, cfg), fontsize=10)
        ax = axes[1, column]
        centers, title = centers_of(rows)
        if centers:
            for layer in range(len(centers[0])):
                for k in range(len(centers[0][layer])):
                    ax.plot(steps(rows), [c[layer][k] for c in centers], linewidth=0.7,
                            color=plt.cm.viridis(layer / max(len(centers[0]) - 1, 1)))
            ax.axhspan(-1, 1, color='tab:green', alpha=0.08, label='[-1, 1]')
            mark_freeze(ax, rows)
            ax.set_title(f'{title}, every layer (colour: depth)', fontsize=10)
        label(ax, rows, 'center value')
    return save(fig, out)


def packed_size(folder):
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
             if f.endswith('.packed')]
    return f"{sizes[0] / 1024:.1f} KB" if len(sizes) == 1 else (
        f"{len(sizes)} files, {sum(sizes) / 1024:.1f} KB" if sizes else '')


def table_row(folder):
    cfg, rows = read_run(folder)
    name = os.path.basename(os.path.normpath(folder))
    if is_federated(rows):
        best = max(rows, key=lambda row: row['q_test_acc_mean'])
        settings = (f"{cfg['algorithm']}, {cfg['n_clients']} clients, {cfg['partition']}, "
                    f"bits {tuple(cfg['client_bits'])}, {len(rows)}/{cfg['rounds']} rounds")
        best_fp = max(r['fp_test_acc_mean'] for r in rows)
        return (f"| {name} | {settings} | {best['q_test_acc_mean']:.4f} (round {best['round']}) "
                f"| {rows[-1]['q_test_acc_mean']:.4f} | {best_fp:.4f} | {packed_size(folder)} |")
    best = max(rows, key=lambda row: row['q_test_acc'])
    settings = (f"resnet{cfg['resn']}, n={cfg['n_centroids']}, lambda_coef {cfg['lambda_coef']:g},"
                f" center_reg_fix={cfg['center_reg_fix']}, {len(rows)}/{cfg['EPOCHS']} epochs")
    return (f"| {name} | {settings} | {best['q_test_acc']:.4f} (epoch {best['epoch']}) | "
            f"{rows[-1]['q_test_acc']:.4f} | {max(r['test_acc'] for r in rows):.4f} | "
            f"{packed_size(folder)} |")


def print_table(folders):
    """One row per run; other entries (Results/README.md, a run with no epoch yet) are named on
    stderr and left out."""
    rows = []
    for folder in folders:
        try:
            rows.append(table_row(folder))
        except RunError as e:
            print(f"left out: {e}", file=sys.stderr)
    if not rows:
        raise RunError(f"none of {', '.join(folders)} holds a run with a completed epoch.")
    print('| run | settings | best quantized (mean personalised) test acc | last | best full '
          'precision | packed |')
    print('| --- | --- | --- | --- | --- | --- |')
    print('\n'.join(rows))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = next((a.split('=', 1)[1] for a in argv if a.startswith('--out=')), 'comparison.png')
    folders = [a for a in argv if not a.startswith('--')]
    if not folders:
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(2)
    try:
        if '--table' in argv:
            print_table(folders)
        elif len(folders) == 1:
            for path in plot_run(folders[0]):
                print(path)
        else:
            print(plot_comparison(folders, out))
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == '__main__':
    main()
