"""Bad input of every kind ends with exit status 2, one paragraph that names the problem and no
traceback, and leaves every file already written as it was; what a user watches is labelled;
the figures draw what they claim."""
import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
import torch

import export
import federated
import main_centralized as mc
import main_federated as mf
import packing
import plot
import resnet
import runtime
from conftest import ROOT, exits_with_error


def digests(folder):
    """{file: sha256} of everything under `folder` (the lock file aside)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name != '.lock':
                path = os.path.join(root, name)
                with open(path, 'rb') as f:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def central_args(cifar_root, tmp_path, *extra, name='run'):
    return [f'--data_root={cifar_root}', f'--results_dir={tmp_path / "results"}',
            f'--run_name={name}', '--resn=8', '--cold_start=True', '--EPOCHS=2',
            '--BATCH_SIZE=50', *extra]


def fed_args(cifar_root, tmp_path, *extra, name='fed'):
    return [f'--data_root={cifar_root}', f'--results_dir={tmp_path / "results"}',
            f'--run_name={name}', '--n_clients=3', '--classes_per_client=5', '--rounds=2',
            '--BATCH_SIZE=20', '--client_archs=(cifarnet,)', '--global_arch=cifarnet', *extra]


def rows(folder):
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


# --- 1. warm starts ------------------------------------------------------------------------------

def test_a_federated_warm_start_that_fits_no_model_is_an_error(cifar_root, tmp_path, capsys):
    torch.save(resnet.build('resnet20').state_dict(), tmp_path / 'r20.pt')
    exits_with_error(capsys, mf.main, fed_args(cifar_root, tmp_path, '--cold_start=False',
                                               f'--pretrained_path={tmp_path}/r20.pt'),
                     'is a resnet20', 'cifarnet', '--cold_start=True')
    assert not (tmp_path / 'results').exists()


def test_a_federated_warm_start_says_which_models_it_loads(cifar_root, tmp_path, capsys):
    torch.save(resnet.build('cifarnet').state_dict(), tmp_path / 'cnet.pt')
    mf.main(fed_args(cifar_root, tmp_path, '--cold_start=False', '--rounds=1',
                     f'--pretrained_path={tmp_path}/cnet.pt'))
    assert f'every cifarnet warm-started from {tmp_path}/cnet.pt' in capsys.readouterr().out


# --- 2. packed files -----------------------------------------------------------------------------

def test_a_packed_file_with_one_byte_changed_is_refused(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    export.main([os.path.join(folder, 'best_quantized.pt')])
    path = os.path.join(folder, 'best_quantized.pt.packed')
    obj = torch.load(path, weights_only=True)
    obj['blob'][100] ^= 1
    torch.save(obj, path)
    before = digests(folder)
    capsys.readouterr()
    exits_with_error(capsys, mc.main, [f'--evaluate={path}', f'--data_root={cifar_root}'],
                     'SHA-256 does not match', 'export it again')
    with pytest.raises(resnet.CheckpointError, match='SHA-256'):
        packing.load_packed(path)
    assert digests(folder) == before


# --- 3, 8, 10, 11. resume ------------------------------------------------------------------------

def test_resuming_the_other_scripts_run_folder_is_refused(cifar_root, tmp_path, capsys):
    central = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    fed = mf.main(fed_args(cifar_root, tmp_path, '--rounds=1'))
    before = {f: digests(f) for f in (central, fed)}
    exits_with_error(capsys, mf.main, [f'--resume={central}'], 'run of main_centralized.py',
                     f'python main_centralized.py --resume={central}')
    exits_with_error(capsys, mc.main, [f'--resume={fed}'], 'run of main_federated.py')
    only_config = tmp_path / 'only_config'
    only_config.mkdir()
    shutil.copy(os.path.join(central, 'config.json'), only_config)
    exits_with_error(capsys, mf.main, [f'--resume={only_config}'], 'main_centralized.py')
    assert {f: digests(f) for f in (central, fed)} == before
    assert os.listdir(only_config) == ['config.json']


@pytest.mark.parametrize('script', ['central', 'federated'])
def test_a_resume_that_shortens_a_run_is_refused(cifar_root, tmp_path, capsys, script):
    main, args, name = ((mc.main, central_args(cifar_root, tmp_path), 'EPOCHS') if
                        script == 'central' else (mf.main, fed_args(cifar_root, tmp_path),
                                                  'rounds'))
    folder = main(args)
    before = digests(folder)
    exits_with_error(capsys, main, [f'--resume={folder}', f'--{name}=1'], 'has completed 2',
                     f'--{name}=1')
    assert digests(folder) == before


def test_a_resume_may_read_the_same_data_from_another_folder_but_not_other_data(
        cifar_root, tmp_path, capsys):
    args = central_args(cifar_root, tmp_path, '--EPOCHS=1', name='moved')
    folder = mc.main(args)
    whole = mc.main(central_args(cifar_root, tmp_path, name='whole'))
    moved = tmp_path / 'moved_data'
    shutil.copytree(cifar_root, moved)
    shutil.rmtree(cifar_root)
    mc.main([f'--resume={folder}', '--EPOCHS=2', f'--data_root={moved}'])
    strip = [{k: v for k, v in row.items() if not k.endswith('seconds')} for row in rows(whole)]
    assert [{k: v for k, v in row.items() if not k.endswith('seconds')}
            for row in rows(folder)] == strip
    other = tmp_path / 'other_data'
    shutil.copytree(moved, other)
    batch = other / 'cifar-10-batches-py' / 'test_batch'
    with open(batch, 'rb') as f:
        content = pickle.load(f)
    content['labels'][0] = (content['labels'][0] + 1) % 10
    with open(batch, 'wb') as f:
        pickle.dump(content, f)
    before = digests(folder)
    exits_with_error(capsys, mc.main, [f'--resume={folder}', '--EPOCHS=3',
                                       f'--data_root={other}'], 'not the data this run')
    assert digests(folder) == before


def test_a_run_folder_is_locked_while_a_process_trains_it(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    before = digests(folder)
    with runtime.locked(folder):  # another process holding it, as far as flock goes
        exits_with_error(capsys, mc.main, [f'--resume={folder}', '--EPOCHS=2'],
                         'another process is training', folder)
    assert digests(folder) == before
    mc.main([f'--resume={folder}', '--EPOCHS=2'])  # released: it goes on
    assert len(rows(folder)) == 2


# --- 4. export of a federated last.pt ------------------------------------------------------------

def test_export_packs_every_client_of_a_federated_last_pt(cifar_root, tmp_path, capsys):
    folder = mf.main(fed_args(cifar_root, tmp_path, '--client_bits=(1,0,2)'))
    last = os.path.join(folder, 'last.pt')
    capsys.readouterr()
    export.main([last])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [os.path.basename(c['path']) for c in out['clients']] == [
        'last.pt.client0.packed', 'last.pt.client2.packed']  # client 1 is full precision
    checkpoint = torch.load(last, weights_only=True)
    x = torch.randn(6, 3, 32, 32)
    cfg = checkpoint['config']
    for client in (0, 2):
        model = resnet.build('cifarnet')
        model.load_state_dict(checkpoint['clients'][client]['model'])
        import utils
        weights = utils.QuantizedWeights(model, utils.cnet_rule(model))
        quantized = resnet.build('cifarnet')
        quantized.load_state_dict({**model.state_dict(), **utils.quantized_state(
            weights, checkpoint['clients'][client]['centers'], cfg['l1'])})
        packed, _ = packing.load_packed(f'{last}.client{client}.packed')
        with torch.no_grad():
            assert torch.equal(packed(x), quantized.eval()(x))


# --- 5. run names --------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['a/b', '..', '/tmp/escape', '../up'])
def test_a_run_name_that_leaves_results_dir_is_refused(cifar_root, tmp_path, capsys, name):
    exits_with_error(capsys, mc.main, central_args(cifar_root, tmp_path, name=name),
                     'is not a folder name')
    exits_with_error(capsys, mf.main, fed_args(cifar_root, tmp_path, name=name),
                     'is not a folder name')
    assert not (tmp_path / 'results').exists() and not os.path.exists('/tmp/escape')


def test_an_empty_results_dir_is_refused(cifar_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exits_with_error(capsys, mf.main, [*fed_args(cifar_root, tmp_path), '--results_dir='],
                     'results_dir is empty')
    assert sorted(os.listdir(tmp_path)) == ['data']


# --- 6, 7. plot and export on damaged or unwritable places ---------------------------------------

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


def refuse_writes(monkeypatch, inside):
    """Writing any file under `inside` fails as in a read-only folder (the tests run as root,
    whom a folder's permissions do not stop)."""
    import tempfile
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir).startswith(os.path.abspath(inside)):
            raise PermissionError(errno.EACCES, 'Permission denied', dir)
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, 'mkstemp', mkstemp)


def test_export_into_an_unwritable_folder_writes_nothing(cifar_root, tmp_path, capsys,
                                                        monkeypatch):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    before = digests(folder)
    refuse_writes(monkeypatch, folder)
    exits_with_error(capsys, export.main, [os.path.join(folder, 'best_quantized.pt')],
                     'cannot write the packed file', 'Permission denied')
    assert digests(folder) == before


def test_plot_to_an_unwritable_place_is_an_error(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    exits_with_error(capsys, plot.main, [folder, folder, f'--out={tmp_path}/no/such/dir/x.png'],
                     'cannot write', 'writable --out')


def test_a_full_disk_during_a_run_keeps_every_checkpoint_at_the_last_epoch(cifar_root, tmp_path,
                                                                          capsys, monkeypatch):
    real = runtime.write_together
    calls = []

    def disk_full_at_epoch_2(files):  # the second epoch's checkpoints, last.pt among them
        if any(os.fspath(path).endswith('last.pt') for path in files):
            calls.append(1)
        if len(calls) == 2 and any(os.fspath(path).endswith('last.pt') for path in files):
            raise OSError(errno.ENOSPC, 'No space left on device', next(iter(files)))
        return real(files)
    monkeypatch.setattr(runtime, 'write_together', disk_full_at_epoch_2)
    args = central_args(cifar_root, tmp_path, '--EPOCHS=3', '--lambda_coef=1e-2')
    exits_with_error(capsys, mc.main, args, 'No space left on device', 'keeps epochs 1-1',
                     '--resume=')
    folder = tmp_path / 'results' / 'run'
    epochs = {name: torch.load(folder / name, weights_only=True)['epoch']
              for name in ('last.pt', 'best_fp.pt', 'best_quantized.pt')}
    assert set(epochs.values()) == {1} and [r['epoch'] for r in rows(folder)] == [1]
    assert not [f for f in os.listdir(folder) if f.startswith('.tmp-')]


# --- 9. full-precision runs ----------------------------------------------------------------------

def test_a_full_precision_run_writes_no_quantized_outputs(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path, '--fp=True', '--fp_epochs=1'))
    out = capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ['.lock', 'best_fp.pt', 'config.json', 'last.pt',
                                          'metrics.jsonl', 'test.txt', 'train.txt']
    line = next(line for line in out.splitlines() if line.startswith('epoch '))
    assert 'lambda' not in line and 'lr2' not in line and 'quantized' not in line
    assert not any(k.startswith('q_') or k in ('centers', 'lambda') for k in rows(folder)[0])
    exits_with_error(capsys, export.main, [os.path.join(folder, 'best_fp.pt')],
                     'full-precision run')
    written = plot.plot_run(folder)
    assert [os.path.basename(p) for p in written] == ['accuracy.png', 'loss.png']
    cfg, _ = plot.read_run(folder)
    assert 'full precision' in plot.run_title(folder, cfg) and 'n=' not in plot.run_title(
        folder, cfg)


# --- 12. tracebacks that became messages ---------------------------------------------------------

@pytest.mark.parametrize('arg, phrase', [
    ('--data_root=', 'data_root is empty'), ('--device=meta', "device='meta'"),
    (f'--seed={2 ** 70}', 'seed='), ('--lambda_coef=nan', 'finite number'),
    ('--val_fraction=1.0', 'val_fraction=1.0')])
def test_values_that_raised_tracebacks(cifar_root, tmp_path, capsys, arg, phrase):
    exits_with_error(capsys, mc.main, central_args(cifar_root, tmp_path) + [arg], phrase)
    assert not (tmp_path / 'results').exists()


def test_bench_without_data_names_its_own_options(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / 'bench' / 'epoch_time.py'),
                             f'--data={tmp_path}/none'], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert '--data=' in result.stderr and '--data_root' not in result.stderr


def test_load_client_model_explains_its_mistakes(cifar_root, tmp_path):
    folder = mf.main(fed_args(cifar_root, tmp_path, '--algorithm=fedavg'))
    best, last = os.path.join(folder, 'best.pt'), os.path.join(folder, 'last.pt')
    with pytest.raises(ValueError, match="client='1': give a client's index as an int"):
        federated.load_client_model(best, '1')
    with pytest.raises(resnet.CheckpointError, match="last.pt, which keeps the clients"):
        federated.load_client_model(last, 0)
    with pytest.raises(resnet.CheckpointError, match='there is no client 99'):
        federated.load_client_model(best, 99)


# --- messages that misled ------------------------------------------------------------------------

@pytest.mark.parametrize('main, script', [(mc.main, 'main_centralized.py'),
                                          (mf.main, 'main_federated.py')])
def test_help_prints_the_usage_and_every_hyperparameter_with_its_comment(capsys, main, script):
    assert main(['--help']) is None
    out = capsys.readouterr().out
    assert f'usage: python {script}' in out
    defaults = mc.DEFAULTS if script == 'main_centralized.py' else mf.DEFAULTS
    assert all(f'--{name}' in out for name in defaults)
    assert 'quantization levels per layer' in out or 'KD temperature T' in out


def test_checkpoint_messages_say_what_the_path_is(cifar_root, tmp_path, capsys):
    exits_with_error(capsys, mc.main, [f'--evaluate={tmp_path}', f'--data_root={cifar_root}'],
                     'is a folder, not a checkpoint')
    torch.save({'model': Terminal()}, tmp_path / 'object.pt')  # an object of a class
    message = exits_with_error(capsys, mc.main, [f'--evaluate={tmp_path}/object.pt',
                                                 f'--data_root={cifar_root}'],
                               'not a checkpoint of this project')
    assert 'weights_only' not in message
    fed = mf.main(fed_args(cifar_root, tmp_path, '--rounds=1'))
    exits_with_error(capsys, mc.main, [f"--evaluate={os.path.join(fed, 'best.pt')}",
                                       f'--data_root={cifar_root}'],
                     'federated.load_client_model')


def test_a_dirichlet_split_with_too_many_clients_does_not_blame_the_batch_size(
        cifar_root, tmp_path, capsys):
    message = exits_with_error(capsys, mf.main, fed_args(
        cifar_root, tmp_path, '--partition=dirichlet', '--n_clients=150'), 'validation image')
    assert 'BATCH_SIZE' not in message


def test_load_model_of_a_packed_file_gives_its_metrics(cifar_root, tmp_path):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    export.main([os.path.join(folder, 'best_quantized.pt')])
    _, info = mc.load_model(os.path.join(folder, 'best_quantized.pt.packed'))
    assert info['metrics']['q_test_acc'] == rows(folder)[0]['q_test_acc']


# --- watching a run ------------------------------------------------------------------------------

class Terminal:
    def __init__(self):
        self.text = ''

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_shows_on_a_terminal_only(cifar_root, tmp_path, capsys, monkeypatch):
    mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1', name='plain'))
    assert 'batches' not in capsys.readouterr().err
    terminal = Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1', name='tty'))
    bars = [bar for bar in terminal.text.split('\r') if bar.strip()]  # tqdm's; then cleared
    assert bars and all(bar.startswith('epoch 1: ') and '/4 [' in bar and 'batches/s' in bar
                        for bar in bars)
    assert terminal.text.endswith('\r')  # the line is cleared for the epoch's own line


def test_console_lines_are_short_and_labelled(cifar_root, tmp_path, capsys):
    mc.main(central_args(cifar_root, tmp_path, '--lr2=1.5e-4'))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith('epoch ')]
    assert all(len(line) < 160 for line in lines)
    assert all(' train ' in line and 's eval ' in line for line in lines)
    assert 'lr2 1.5e-04' in lines[0] and 'quirk 5' in out
    mf.main(fed_args(cifar_root, tmp_path, '--algorithm=fedavg'))
    fed_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('round')]
    assert fed_lines and all('global model acc' in line and 'personalised' not in line
                             for line in fed_lines)


# --- figures -------------------------------------------------------------------------------------

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
    folder = mf.main(fed_args(cifar_root, tmp_path, '--client_bits=(1,2)'))
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
    folder = mf.main(fed_args(cifar_root, tmp_path, '--algorithm=fedavg'))
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


def test_table_counts_the_best_models_packed_files_and_names_federated_architectures(
        cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    export.main([os.path.join(folder, 'best_quantized.pt')])
    export.main([os.path.join(folder, 'last.pt')])
    fed = mf.main(fed_args(cifar_root, tmp_path))
    capsys.readouterr()
    plot.main(['--table', folder, fed])
    table = capsys.readouterr().out
    size = os.path.getsize(os.path.join(folder, 'best_quantized.pt.packed')) / 1024
    assert f'| {size:.1f} KB |' in table
    assert 'cifarnet (global cifarnet)' in table
