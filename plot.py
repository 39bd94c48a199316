"""Curves of runs, as PNGs (matplotlib, Agg).

    python plot.py Results/<run>                  accuracy, loss, schedule and centers PNGs
                                                  in the run's folder (or the folder --out)
    python plot.py Results/<a> Results/<b> ...    one side-by-side comparison.png (--out=PATH)
    python plot.py --table Results/*              one markdown row per run
    python plot.py --sweep=Results/<sweep>        the sweep's settings with error bars
                                                  (sweep.png in its folder, or --out=PATH)

Reads what the scripts write (metrics.jsonl, config.json, summary.json) and never changes it.
Centralized runs: full-precision and quantized test accuracy, training and quantized training
loss, lambda, lambda2 and lr2 as steps, every layer's centers (named) with [-1, 1] marked;
federated runs: the clients' accuracy (mean, min, max), the global model's, and the centers of
one client of every kind (architecture and bits). The freeze is a vertical line.
"""
import math
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter  # noqa: E402

import federated  # noqa: E402
import resnet  # noqa: E402
import runs  # noqa: E402
import utils  # noqa: E402

DPI = 100
FREEZE_STYLE = {'color': 'grey', 'linestyle': ':', 'linewidth': 1.2}
COLOURS = {'fp': 'tab:blue', 'quantized': 'tab:orange', 'global': 'tab:green',
           'train': 'tab:purple'}  # one meaning per colour, in every figure
MARKERS = 40  # runs with at most this many points show a marker on each


RunError = runs.RunError


def read_run(folder):
    """(config with its `kind`, rows) of a run folder."""
    kind, cfg, rows = runs.read_run(folder)
    return {**cfg, 'kind': kind}, rows


def is_federated(cfg):
    return cfg['kind'] != 'centralized'


def unit(cfg):
    return runs.unit_of(cfg['kind'])


def steps(cfg, rows):
    return [row[unit(cfg)] for row in rows]


def freeze_step(cfg, rows):
    return next((s for s, row in zip(steps(cfg, rows), rows) if row.get('frozen')), None)


def mark_freeze(ax, cfg, rows):
    step = freeze_step(cfg, rows)
    if step is not None:
        ax.axvline(step, **FREEZE_STYLE, label=f'freeze ({step})')


def style(rows):
    """Markers on every point of a short run, so that one epoch still shows."""
    return {'marker': 'o', 'markersize': 3} if len(rows) <= MARKERS else {}


def whole_ticks(ax, cfg, rows):
    """Epochs and rounds are whole numbers: ticks at whole numbers only, a short run's span
    widened so that there are some."""
    x = steps(cfg, rows)
    if x[-1] - x[0] < 4:
        ax.set_xlim(x[0] - 0.5, x[-1] + 0.5)
        ax.set_xticks(range(x[0], x[-1] + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def label(ax, cfg, rows, ylabel):
    ax.set_xlabel(unit(cfg))
    ax.set_ylabel(ylabel)
    whole_ticks(ax, cfg, rows)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def model_label(cfg):
    """What the accuracy of a run is the accuracy of."""
    algorithm = federated.ALGORITHMS.get(cfg.get('algorithm'))
    return 'quantized' if algorithm is None else algorithm.label


def run_title(folder, cfg):
    name = os.path.basename(os.path.normpath(folder))
    if is_federated(cfg):
        archs = ', '.join(cfg['client_archs'])
        bits = ', '.join(f'{b} bit' if b else 'full precision' for b in cfg['client_bits'])
        return f"{name}: {cfg['algorithm']}, {cfg['n_clients']} clients ({archs}; {bits})"
    kind = 'full precision' if cfg.get('fp') else f"n={cfg['n_centroids']}"
    return f"{name}: resnet{cfg['resn']}, {kind}, center_reg_fix={cfg['center_reg_fix']}"


def plot_accuracy(ax, rows, cfg):
    x = steps(cfg, rows)
    if is_federated(cfg):
        q = [[c['q_test_acc'] for c in row['clients']] for row in rows]
        personal = federated.ALGORITHMS[cfg['algorithm']].personalised
        name = model_label(cfg)
        colour = COLOURS['quantized'] if personal else COLOURS['global']
        ax.fill_between(x, [min(v) for v in q], [max(v) for v in q], alpha=0.2, color=colour,
                        label=f'{name}, min-max over clients')
        ax.plot(x, [row['q_test_acc_mean'] for row in rows], color=colour,
                label=f'{name}, mean', **style(rows))
        if personal:
            ax.plot(x, [row['fp_test_acc_mean'] for row in rows], '--', color=COLOURS['fp'],
                    label='personalised full precision, mean', **style(rows))
        if personal and rows[0]['global_test_acc_mean'] is not None:
            ax.plot(x, [row['global_test_acc_mean'] for row in rows], color=COLOURS['global'],
                    label='global model, mean', **style(rows))
    else:
        ax.plot(x, [row['test_acc'] for row in rows], color=COLOURS['fp'],
                label='full precision', **style(rows))
        if 'q_test_acc' in rows[0]:
            ax.plot(x, [row['q_test_acc'] for row in rows], color=COLOURS['quantized'],
                    label='quantized', **style(rows))
    ax.set_ylim(0, 1)
    mark_freeze(ax, cfg, rows)
    label(ax, cfg, rows, 'test accuracy')


def log_axis(ax, values):
    """A log scale with ticks at 1, 2 and 5 times each power of ten when the values span more
    than a factor of 20, else a linear one: either way several labelled ticks."""
    values = [v for v in values if v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale('log')
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot_loss(ax, rows, cfg):
    x, plotted = steps(cfg, rows), []
    if is_federated(cfg):
        for key, name, colour in (('train_loss', 'personalised', COLOURS['fp']),
                                  ('global_train_loss', 'global copy', COLOURS['global'])):
            values = [[c[key] for c in row['clients'] if c.get(key) is not None] for row in rows]
            if all(values):
                means = [sum(v) / len(v) for v in values]
                ax.plot(x, means, color=colour, label=f'{name}, mean over clients', **style(rows))
                plotted += means
    else:
        curves = [('train_loss', 'training loss (full precision)', COLOURS['fp']),
                  ('q_train_loss', 'quantized training loss', COLOURS['quantized'])]
        for key, name, colour in curves:
            if key in rows[0]:
                values = [row[key] for row in rows]
                ax.plot(x, values, color=colour, label=name, **style(rows))
                plotted += values
    log_axis(ax, plotted)
    mark_freeze(ax, cfg, rows)
    label(ax, cfg, rows, 'loss')


def has_schedule(rows):
    return rows[0].get('lambda') is not None


def plot_schedule(ax, rows, cfg):
    """lambda and lambda2 (left) and lr2 (right), as the steps they are."""
    x = steps(cfg, rows)
    ax.plot(x, [row['lambda'] for row in rows], drawstyle='steps-post', label='lambda',
            **style(rows))
    ax.plot(x, [row['lambda2'] for row in rows], '--', drawstyle='steps-post', label='lambda2',
            **style(rows))
    mark_freeze(ax, cfg, rows)
    label(ax, cfg, rows, 'lambda, lambda2')
    right = ax.twinx()
    right.plot(x, [max(row['lr2'], 1e-12) for row in rows], color='tab:red',
               drawstyle='steps-post', label='lr2 (right)')
    right.set_yscale('log')
    right.set_ylabel('lr2')
    right.legend(fontsize=8, loc='lower right')


def layer_names(cfg, arch):
    """The quantized layers' names, in the rows of the centers."""
    model = resnet.build(arch)
    rule = utils.cnet_rule if arch.startswith('cifarnet') else utils.resnet_rule
    return rule(model)


def center_series(cfg, rows):
    """[(title, layer names, [steps][layers][n] centers)]: the run's, or for a federated run
    those of the first client of every kind of model that has centers."""
    if not is_federated(cfg):
        if not rows[0].get('centers'):
            return []
        return [('centers', layer_names(cfg, f"resnet{cfg['resn']}"),
                 [row['centers'] for row in rows])]
    series, seen = [], set()
    for client in rows[0]['clients']:
        kind = (client['arch'], client['bits'])
        if client.get('centers') and kind not in seen:
            seen.add(kind)
            series.append((f"client {client['client']} ({client['arch']}, {client['bits']} bit)",
                           layer_names(cfg, client['arch']),
                           [row['clients'][client['client']]['centers'] for row in rows]))
    return series


def plot_centers(fig, rows, cfg):
    """One panel per (kind, layer), one line per center, [-1, 1] shaded behind them."""
    series = center_series(cfg, rows)
    if not series:
        return False
    x = steps(cfg, rows)
    panels = [(title, name, [c[layer] for c in centers]) for title, names, centers in series
              for layer, name in enumerate(names)]
    cols = min(len(panels), max(len(names) for _, names, _ in series), 6)
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, sharex=True, squeeze=False).flatten()
    step = freeze_step(cfg, rows)
    for ax, panel in zip(axes, panels + [None] * (len(axes) - len(panels))):
        if panel is None:
            ax.axis('off')
            continue
        title, name, values = panel
        ax.axhspan(-1, 1, color='tab:green', alpha=0.08, zorder=0)
        for k in range(len(values[0])):
            ax.plot(x, [v[k] for v in values], linewidth=1.2, zorder=3, label=f'center {k}',
                    **style(rows))
        if step is not None:
            ax.axvline(step, **FREEZE_STYLE, zorder=1)
        ax.set_title(f'{title}\n{name}' if len(series) > 1 else name, fontsize=7)
        ax.tick_params(labelsize=7)
        whole_ticks(ax, cfg, rows)
        ax.set_xlabel(unit(cfg), fontsize=7)
        ax.set_ylabel('center value', fontsize=7)
    axes[0].legend(fontsize=6)
    fig.suptitle(f'centers per {unit(cfg)} '
                 f'([-1, 1] shaded, freeze dotted)', fontsize=10)
    return True


def save(fig, path):
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as e:
        raise RunError(f"cannot write {path} ({e.strerror}): give a writable --out, or copy the "
                       f"run to a writable folder.") from None
    finally:
        plt.close(fig)
    return path


def plot_run(folder, out=None):
    """The run's PNGs, written into its folder (or the folder `out`); returns their paths. Runs
    without a schedule (full precision, fedavg) get no schedule.png, runs without centers no
    centers.png."""
    cfg, rows = read_run(folder)
    if out is not None:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create {out} ({e.strerror}): give --out a writable "
                           f"folder.") from None
    into = folder if out is None else out
    draws = [('accuracy', plot_accuracy), ('loss', plot_loss)]
    if has_schedule(rows):
        draws.append(('schedule', plot_schedule))
    written = []
    for name, draw in draws:
        fig, ax = plt.subplots(figsize=(8, 5), layout='constrained')
        draw(ax, rows, cfg)
        ax.set_title(run_title(folder, cfg), fontsize=10)
        written.append(save(fig, os.path.join(into, f'{name}.png')))
    fig = plt.figure(figsize=(12, 8), layout='constrained')
    if plot_centers(fig, rows, cfg):
        written.append(save(fig, os.path.join(into, 'centers.png')))
    else:
        plt.close(fig)
    return written


def plot_comparison(folders, out):
    """Runs side by side: accuracy on top (the same colour meaning the same model in every
    panel), every layer's centers below, coloured by depth with a colour bar."""
    runs = [read_run(folder) for folder in folders]
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 8), squeeze=False,
                             layout='constrained')
    depth = plt.cm.viridis
    for column, (folder, (cfg, rows)) in enumerate(zip(folders, runs)):
        plot_accuracy(axes[0, column], rows, cfg)
        axes[0, column].set_title(run_title(folder, cfg), fontsize=10)
        ax = axes[1, column]
        series = center_series(cfg, rows)
        if series:
            title, names, centers = series[0]
            for layer in range(len(names)):
                for k in range(len(centers[0][layer])):
                    ax.plot(steps(cfg, rows), [c[layer][k] for c in centers], linewidth=0.7,
                            color=depth(layer / max(len(names) - 1, 1)))
            ax.axhspan(-1, 1, color='tab:green', alpha=0.08, label='[-1, 1]', zorder=0)
            mark_freeze(ax, cfg, rows)
            ax.set_title(f'{title}: every layer', fontsize=10)
            bar = fig.colorbar(plt.cm.ScalarMappable(
                cmap=depth, norm=plt.Normalize(0, len(names) - 1)), ax=ax)
            bar.set_label('quantized layer (0 = first)')
        label(ax, cfg, rows, 'center value')
    return save(fig, out)


def plot_sweep(folder, out=None):
    """sweep.png (or `out`) of the sweep in `folder` (sweep_figure)."""
    path = os.path.join(folder, 'summary.json')
    if not os.path.isfile(path):
        kind = ('a run folder: draw it with python plot.py ' + folder
                if os.path.isfile(os.path.join(folder, 'config.json')) else
                'no sweep folder')
        raise RunError(f"{folder} holds no summary.json, so it is {kind}. --sweep takes the "
                       f"folder sweep.py made (results_dir/<sweep name>); its summary is "
                       f"written once a run has finished.")
    summary = runs.read_json(path)
    if not summary['settings']:
        raise RunError(f"{folder}/summary.json holds no finished setting yet.")
    fig = sweep_figure(summary, os.path.basename(os.path.normpath(folder)))
    return save(fig, out or os.path.join(folder, 'sweep.png'))


def sweep_figure(summary, name):
    """The sweep's settings: test accuracy at the round chosen on validation and at the last
    round (weighted), mean over seeds with the standard deviation as error bars."""
    entries = summary['settings']
    names = [', '.join(f'{k}={v}' for k, v in e['setting'].items()) or 'all' for e in entries]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(entries) + 2), 5), layout='constrained')
    width = 0.38
    bars = ((-width / 2, 'selected_weighted', 'round chosen on validation', COLOURS['quantized']),
            (width / 2, 'last_weighted', 'last round', COLOURS['fp']))
    for offset, key, label, colour in bars:
        stats = [e[key] for e in entries]
        ax.bar([i + offset for i in range(len(entries))],
               [0 if s is None else s['mean'] for s in stats], width,
               yerr=[0 if s is None or s['std'] is None else s['std'] for s in stats],
               capsize=4, color=colour, label=f'test accuracy at the {label}')
    ax.set_xticks(range(len(entries)), names, rotation=20, ha='right', fontsize=8)
    ax.set_ylabel('test accuracy (all clients, weighted)')
    ax.set_ylim(0, 1)
    ax.grid(axis='y', alpha=0.3)
    seeds = sorted({len(e['seeds']) for e in entries})
    ax.set_title(f"{name}: mean over {'/'.join(map(str, seeds))} seeds, error bars one standard "
                 f"deviation", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def packed_size(folder, cfg):
    """The packed size of the run's best quantized model(s)."""
    if not is_federated(cfg):
        path = os.path.join(folder, 'best_quantized.pt.packed')
        return f"{os.path.getsize(path) / 1024:.1f} KB" if os.path.isfile(path) else ''
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
             if f.startswith('best.pt.client') and f.endswith('.packed')]
    return f"{len(sizes)} clients, {sum(sizes) / len(sizes) / 1024:.1f} KB each" if sizes else ''


def table_row(folder):
    cfg, rows = read_run(folder)
    name = os.path.basename(os.path.normpath(folder))
    if is_federated(cfg):
        best = max(rows, key=lambda row: row['q_val_acc_weighted'])
        settings = (f"{cfg['algorithm']}, {cfg['n_clients']} clients, {cfg['partition']}, "
                    f"{'/'.join(cfg['client_archs'])} (global {cfg['global_arch']}), bits "
                    f"{tuple(cfg['client_bits'])}, {len(rows)}/{cfg['rounds']} rounds")
        return (f"| {name} | {settings} | {best['q_test_acc_weighted']:.4f} (round "
                f"{best['round']}, chosen on validation) | {rows[-1]['q_test_acc_weighted']:.4f} "
                f"| {max(r['fp_test_acc_weighted'] for r in rows):.4f} | "
                f"{packed_size(folder, cfg)} |")
    key = 'test_acc' if cfg.get('fp') else 'q_test_acc'
    if cfg.get('val_fraction'):
        best, how = max(rows, key=lambda row: row[key.replace('test', 'val')]), 'on validation'
    else:
        best, how = max(rows, key=lambda row: row[key]), 'on test, as the authors'
    kind = 'full precision' if cfg.get('fp') else f"n={cfg['n_centroids']}"
    _, total = runs.total_of(cfg['kind'], cfg)
    settings = (f"resnet{cfg['resn']}, {kind}, lambda_coef {cfg['lambda_coef']:g}, "
                f"center_reg_fix={cfg['center_reg_fix']}, {len(rows)}/{total} epochs")
    return (f"| {name} | {settings} | {best[key]:.4f} (epoch {best['epoch']}, chosen {how}) | "
            f"{rows[-1][key]:.4f} | {max(r['test_acc'] for r in rows):.4f} | "
            f"{packed_size(folder, cfg)} |")


def print_table(folders):
    """One row per run; other entries (Results/README.md, a run with no epoch yet, a damaged
    one) are named on stderr and left out."""
    rows = []
    for folder in folders:
        try:
            rows.append(table_row(folder))
        except RunError as e:
            print(f"left out: {e}", file=sys.stderr)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            print(f"left out: {folder}: its config.json or metrics.jsonl lacks what a run of "
                  f"this project writes ({type(e).__name__}: {e})", file=sys.stderr)
    if not rows:
        raise RunError(f"none of {', '.join(folders)} holds a run with a completed epoch.")
    print('| run | settings | best quantized test acc (all clients) | last | best full '
          'precision | packed best |')
    print('| --- | --- | --- | --- | --- | --- |')
    print('\n'.join(rows))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    options = {a.split('=', 1)[0]: a.split('=', 1)[1] for a in argv if a.startswith('--')
               and '=' in a}
    folders = [a for a in argv if not a.startswith('--')]
    if not folders and '--sweep' not in options:
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(2)
    try:
        if '--sweep' in options:
            print(plot_sweep(options['--sweep'], options.get('--out')))
        elif '--table' in argv:
            print_table(folders)
        elif len(folders) == 1:
            for path in plot_run(folders[0], options.get('--out')):
                print(path)
        else:
            print(plot_comparison(folders, options.get('--out', 'comparison.png')))
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == '__main__':
    main()
