"""plot.py on folders a user may hand it by mistake, or that were damaged: one paragraph, exit
status 2, nothing written; --table leaves such runs out; --out for one run's PNGs."""
import builtins
import json
import os
import struct

import matplotlib.pyplot as plt
import pytest

import export
import main_centralized as mc
import main_federated as mf
import plot
import runs
from conftest import central_args, cnn_fed_args, digests, exits_with_error, run_folder


@pytest.fixture
def run(cifar_root, tmp_path):
    return mc.main([f'--data_root={cifar_root}', f'--results_dir={tmp_path}', '--run_name=run',
                    '--resn=8', '--cold_start=True', '--EPOCHS=1', '--BATCH_SIZE=128'])


def test_one_runs_pngs_go_where_out_says(run, tmp_path, capsys):
    plot.main([run, f'--out={tmp_path}/figures'])
    written = capsys.readouterr().out.split()
    assert written and all(p.startswith(f'{tmp_path}/figures/') for p in written)
    assert not [f for f in os.listdir(run) if f.endswith('.png')]


def test_a_run_folder_given_as_a_sweep_is_named(run, capsys):
    exits_with_error(capsys, plot.main, [f'--sweep={run}'], 'holds no summary.json',
                     f'a run folder: draw it with python plot.py {run}')


@pytest.mark.parametrize('config, metrics, phrase', [
    ('[]', None, 'does not hold a configuration'),
    (None, '5\n', 'line 1 of'),
])
def test_damaged_run_files_are_named(run, capsys, config, metrics, phrase):
    if config is not None:
        with open(os.path.join(run, 'config.json'), 'w') as f:
            f.write(config)
    if metrics is not None:
        with open(os.path.join(run, 'metrics.jsonl'), 'w') as f:
            f.write(metrics)
    before = sorted(os.listdir(run))
    exits_with_error(capsys, plot.main, [run], phrase)
    assert sorted(os.listdir(run)) == before


def test_an_unreadable_metrics_file_is_left_out_of_a_table(run, cifar_root, tmp_path, capsys,
                                                          monkeypatch):
    other = mc.main([f'--data_root={cifar_root}', f'--results_dir={tmp_path}', '--run_name=b',
                     '--resn=8', '--cold_start=True', '--EPOCHS=1', '--BATCH_SIZE=128'])
    denied_path = os.path.join(run, 'metrics.jsonl')

    def guarded_open(path, *args, **kwargs):  # root reads every file: deny one by hand
        if os.fspath(path) == denied_path:
            raise PermissionError(13, 'Permission denied', path)
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(runs, 'open', guarded_open, raising=False)
    capsys.readouterr()
    plot.main(['--table', run, other])
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert len(table) == 3 and table[2].startswith('| b |')
    assert f'left out: {denied_path} cannot be read: permission denied' in captured.err


def test_a_table_leaves_out_a_run_whose_files_lack_keys(run, capsys):
    with open(os.path.join(run, 'config.json'), 'w') as f:
        json.dump({'EPOCHS': 1}, f)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        plot.main(['--table', run])
    assert exit_info.value.code == 2
    left_out, error = capsys.readouterr().err.strip().splitlines()
    assert left_out.startswith(f'left out: {run}: its config.json or metrics.jsonl lacks what')
    assert error.startswith('error: none of') and 'Traceback' not in error


# --- damaged and unwritable places ---------------------------------------------------------------

def test_plot_on_a_corrupt_log_says_which_line_and_the_table_leaves_it_out(cifar_root, tmp_path,
                                                                          capsys):
    good = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1', name='good'))
    bad = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1', name='bad'))
    with open(os.path.join(bad, 'metrics.jsonl'), 'a') as f:
        f.write('{"epoch": 2, "trunc\n')
    before = digests(bad)
    capsys.readouterr()
    exits_with_error(capsys, plot.main, [bad], 'line 2 of', 'not a JSON object')
    plot.main(['--table', good, bad])
    captured = capsys.readouterr()
    assert 'good' in captured.out and '| bad |' not in captured.out
    assert 'left out' in captured.err and 'line 2' in captured.err
    assert digests(bad) == before


def test_plot_to_an_unwritable_place_is_an_error(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    exits_with_error(capsys, plot.main, [folder, folder, f'--out={tmp_path}/no/such/dir/x.png'],
                     'cannot write', 'writable --out')


# --- what the figures draw -----------------------------------------------------------------------

def drawn(draw, rows_, cfg):
    fig, ax = plt.subplots()
    draw(ax, rows_, cfg)
    return fig, ax


def test_figures_of_a_one_epoch_run_show_markers_and_whole_ticks(cifar_root, tmp_path):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    cfg, rows_ = plot.read_run(folder)
    for draw in (plot.plot_accuracy, plot.plot_loss, plot.plot_schedule):
        fig, ax = drawn(draw, rows_, cfg)
        lines = [line for line in ax.get_lines() if not line.get_label().startswith('freeze')]
        assert lines and all(line.get_marker() == 'o' for line in lines)
        fig.canvas.draw()
        assert all(float(t).is_integer() for t in ax.get_xticks())
        assert ax.get_xlabel() == 'epoch' and ax.get_ylabel()
        plt.close(fig)


def test_schedule_draws_steps_and_the_loss_axis_has_several_labels(cifar_root, tmp_path):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=3', '--freeze_epoch=2'))
    cfg, rows_ = plot.read_run(folder)
    fig, ax = drawn(plot.plot_schedule, rows_, cfg)
    assert {line.get_drawstyle() for line in ax.get_lines()
            if not line.get_label().startswith('freeze')} == {'steps-post'}
    plt.close(fig)
    fig, ax = drawn(plot.plot_loss, rows_, cfg)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    assert len([t for t in ax.get_yticks() if low <= t <= high]) >= 3
    plt.close(fig)


def test_centers_figure_names_layers_labels_axes_and_draws_every_bit_width(cifar_root, tmp_path):
    folder = mf.main(cnn_fed_args(cifar_root, tmp_path, '--client_bits=(1,2)'))
    cfg, rows_ = plot.read_run(folder)
    fig = plt.figure()
    assert plot.plot_centers(fig, rows_, cfg)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.lines]
    assert any('1 bit' in t for t in titles) and any('2 bit' in t for t in titles)
    assert any('fc1.weight' in t for t in titles)
    panels = [ax for ax in fig.axes if ax.lines]
    assert all(ax.get_ylabel() == 'center value' and ax.get_xlabel() == 'round' for ax in panels)
    assert {len([line for line in ax.lines if line.get_label().startswith('center')])
            for ax in panels} == {2, 4}  # 1 bit: two centers; 2 bits: four
    assert panels[0].get_legend() is not None
    plt.close(fig)


def test_fedavg_figures_label_the_global_model_and_draw_no_schedule(cifar_root, tmp_path):
    folder = mf.main(cnn_fed_args(cifar_root, tmp_path, '--algorithm=fedavg'))
    written = plot.plot_run(folder)
    assert [os.path.basename(p) for p in written] == ['accuracy.png', 'loss.png']
    cfg, rows_ = plot.read_run(folder)
    fig, ax = drawn(plot.plot_accuracy, rows_, cfg)
    labels = [line.get_label() for line in ax.get_lines()]
    assert any('global model' in label for label in labels)
    assert not any('personalised' in label for label in labels)
    plt.close(fig)


def test_comparison_colours_mean_one_thing_and_depth_has_a_colour_bar(cifar_root, tmp_path):
    a = mc.main(central_args(cifar_root, tmp_path, name='a'))
    b = mc.main(central_args(cifar_root, tmp_path, '--center_reg_fix=True', name='b'))
    path = plot.plot_comparison([a, b], str(tmp_path / 'cmp.png'))
    assert os.path.isfile(path)
    cfg, rows_ = plot.read_run(a)
    fig, ax = drawn(plot.plot_accuracy, rows_, cfg)
    colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert colours['full precision'] == plot.COLOURS['fp']
    assert colours['quantized'] == plot.COLOURS['quantized']
    plt.close(fig)


# --- tables --------------------------------------------------------------------------------------

def test_table_counts_the_best_models_packed_files_and_names_federated_architectures(
        cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    export.main([os.path.join(folder, 'best_quantized.pt')])
    export.main([os.path.join(folder, 'last.pt')])
    fed = mf.main(cnn_fed_args(cifar_root, tmp_path))
    capsys.readouterr()
    plot.main(['--table', folder, fed])
    table = capsys.readouterr().out
    size = os.path.getsize(os.path.join(folder, 'best_quantized.pt.packed')) / 1024
    assert f'| {size:.1f} KB |' in table
    assert 'cifarnet (global cifarnet)' in table


# --- figures and tables of real runs -------------------------------------------------------------

def png_size(path):
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR'
    return struct.unpack('>II', head[16:24])


def test_plots_of_real_runs(cifar_root, tmp_path, capsys):
    central = run_folder(cifar_root, tmp_path, '--freeze_epoch=2', '--n_centroids=4')
    federated = mf.main([f'--data_root={cifar_root}', f'--results_dir={tmp_path}',
                         '--run_name=f', '--n_clients=3', '--classes_per_client=5', '--rounds=2',
                         '--BATCH_SIZE=20', '--client_archs=(resnet8,)', '--global_arch=resnet8'])
    for folder in (central, federated):
        written = plot.plot_run(folder)
        assert [os.path.basename(p) for p in written] == [
            'accuracy.png', 'loss.png', 'schedule.png', 'centers.png']
        assert [png_size(p) for p in written] == [(800, 500)] * 3 + [(1200, 800)]
    plot.main([central, federated, f'--out={tmp_path}/cmp.png'])
    assert png_size(tmp_path / 'cmp.png') == (1200, 800)
    capsys.readouterr()
    plot.main(['--table', central, federated, str(tmp_path / 'cmp.png')])
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert len(table) == 4 and table[0].startswith('| run |') and 'quped' in table[3]
    assert 'left out' in captured.err and 'cmp.png' in captured.err


def test_plot_explains_folders_without_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert 'is not a run folder' in capsys.readouterr().err
    (tmp_path / 'config.json').write_text('{}')
    exits_with_error(capsys, plot.main, [str(tmp_path)], 'holds no run of this project')
    (tmp_path / 'config.json').write_text('{"kind": "centralized"}')
    exits_with_error(capsys, plot.main, [str(tmp_path)], 'no completed epoch')
