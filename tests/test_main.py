"""main_centralized.py and data.py: overrides, schedules, data, outputs, resume, bad input."""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import export
import main_centralized as mc
import main_federated as mf
import plot
import resnet
import runs
import runtime
import training
import utils
from conftest import (DEVICES, MINI, NO_CUDA, PRETRAINED, ROOT, central_args, cnn_fed_args, digests,
                      exits_with_error, needs, rows, stop, write_batch)

TIMINGS = ('train_seconds', 'eval_seconds')


def without_timings(metrics):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in metrics]


def fails_with(capsys, argv, *phrases):
    return exits_with_error(capsys, mc.main, argv, *phrases)


# --- overrides -------------------------------------------------------------------------------

def test_overrides_are_checked_against_the_defaults_types():
    got = runtime.parse_overrides(mc.DEFAULTS, [
        '--lambda_coef=8e-4', '--lr2=0', '--EPOCHS=30', '--adam=False',
        '--lr2_milestones=(10,17)', '--lr_milestones=[5]', '--run_name=123', '--device=cpu'])
    assert got == {'lambda_coef': 8e-4, 'lr2': 0.0, 'EPOCHS': 30, 'adam': False,
                   'lr2_milestones': (10, 17), 'lr_milestones': (5,), 'run_name': '123',
                   'device': 'cpu'}
    assert type(got['lr2']) is float  # an int where a float is expected is fine


@pytest.mark.parametrize('arg, phrase', [
    ('--EPOCHS=ten', 'is not int'), ('--EPOCHS=2.5', 'is not int'), ('--adam=yes', 'is not bool'),
    ('--lr2=abc', 'is not float'), ('--n_centroids=True', 'is not int'),
    ('--lr2_milestones=(1.5,3)', 'tuple of ints'), ('EPOCHS=3', '--name=value'),
    ('--EPOCHS', '--name=value')])
def test_ill_typed_or_malformed_overrides(arg, phrase):
    with pytest.raises(mc.ConfigError, match=phrase):
        runtime.parse_overrides(mc.DEFAULTS, [arg])


def test_unknown_name_lists_the_valid_ones(capsys):
    message = fails_with(capsys, ['--epochs=3'], "unknown hyperparameter 'epochs'")
    assert all(name in message for name in mc.DEFAULTS)


def test_defaults_are_the_papers_headline_setting():
    d = mc.DEFAULTS
    assert (d['resn'], d['n_centroids'], d['cold_start'], d['adam'], d['l1']) == (20, 2, False,
                                                                                 True, True)
    assert (d['lambda_coef'], d['lr2'], d['freeze_epoch'], d['EPOCHS'], d['BATCH_SIZE']) == (
        1e-4, 1e-4, 200, 250, 128)
    assert d['center_reg_fix'] is False


# --- a whole run -----------------------------------------------------------------------------

def test_two_epoch_run_writes_every_output(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path))
    out = capsys.readouterr().out
    assert 'device: cpu' in out and 'data: 200 training and 40 test images' in out
    assert out.count('epoch ') >= 2 and '"EPOCHS": 2' in out
    epoch_lines = [line for line in out.splitlines() if line.startswith('epoch ')]
    assert epoch_lines[0].split(' | ')[-1].startswith('eta ')
    assert epoch_lines[1].endswith('| done')
    assert sorted(os.listdir(folder)) == sorted(
        ['.lock', 'best_fp.pt', 'best_quantized.pt', 'config.json', 'last.pt', 'metrics.jsonl',
         'q_testacc.txt', 'q_trainloss.txt', 'test.txt', 'train.txt'])
    metrics = rows(folder)
    assert [row['epoch'] for row in metrics] == [1, 2]
    for filename, key in mc.LOGS.items():
        with open(os.path.join(folder, filename)) as f:
            assert json.load(f) == [row[key] for row in metrics]
    for row in metrics:
        assert 0 <= row['test_acc'] <= 1 and 0 <= row['q_test_acc'] <= 1
        assert len(row['centers']) == 6 and sum(map(sum, row['members'])) == sum(
            utils.QuantizedWeights(resnet.build('resnet8')).numels)
    assert metrics[1]['lambda'] == pytest.approx(2e-4)
    with open(os.path.join(folder, 'config.json')) as f:
        assert json.load(f)['EPOCHS'] == 2
    best_q = torch.load(os.path.join(folder, 'best_quantized.pt'), weights_only=True)
    assert set(best_q) == {'kind', 'file', 'state_dict', 'centers', 'config', 'epoch', 'metrics',
                           'quantized', 'quantized_names'}
    assert best_q['quantized'] is True and len(best_q['quantized_names']) == 6
    assert best_q['config']['n_centroids'] == 2


def test_best_quantized_checkpoint_reproduces_its_logged_accuracy(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path))
    model, info = runs.load_model(os.path.join(folder, 'best_quantized.pt'))
    best = max(rows(folder), key=lambda row: row['q_test_acc'])
    assert info['epoch'] == best['epoch'] and info['config']['resn'] == 8
    cifar = data.load_cifar10(cifar_root, 'cpu')
    assert runtime.evaluate(model, cifar['test_x'], cifar['test_y'])[1] == best['q_test_acc']
    weights = utils.QuantizedWeights(model)  # the weights sit on the saved centers
    centers = torch.tensor(best['centers'])
    assert torch.equal(weights.flat(), utils.quantize(weights.flat(), weights.layer, centers)[0])
    capsys.readouterr()
    mc.main([f'--evaluate={folder}/best_quantized.pt', f'--data_root={cifar_root}'])
    out = capsys.readouterr().out
    assert f"test accuracy {best['q_test_acc']:.4f}" in out
    assert f"saved after epoch {best['epoch']}" in out


@pytest.mark.parametrize('device', DEVICES)
def test_same_seed_same_numbers(cifar_root, tmp_path, device):
    a = mc.main(central_args(cifar_root, tmp_path, f'--device={device}', name='a'))
    b = mc.main(central_args(cifar_root, tmp_path, f'--device={device}', name='b'))
    assert without_timings(rows(a)) == without_timings(rows(b))


def test_fp_run_saves_a_warm_start_that_loads(cifar_root, tmp_path, capsys):
    target = tmp_path / 'pretrained' / 'mine.pt'
    mc.main(central_args(cifar_root, tmp_path, '--fp=True', '--fp_epochs=1',
                         '--save_pretrained=True', f'--pretrained_path={target}', name='fp'))
    assert rows(tmp_path / 'results' / 'fp')[0]['lr1'] == training.SGD_LR
    folder = mc.main(central_args(cifar_root, tmp_path, '--cold_start=False', '--EPOCHS=1',
                              f'--pretrained_path={target}', name='warm'))
    assert f'warm start from {target}' in capsys.readouterr().out
    assert len(rows(folder)) == 1
    fails_with(capsys, central_args(cifar_root, tmp_path, '--fp=True', '--save_pretrained=True',
                                f'--pretrained_path={target}', name='again'), 'overwrite')


# --- resume ----------------------------------------------------------------------------------

RESUME_ARGS = ('--adam=False', '--lr_milestones=(2,)', '--freeze_epoch=3', '--EPOCHS=4',
               '--n_centroids=4')  # central_args' ResNet-8: kills do not depend on depth


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in the run catches it."""


def killed_after(function, epochs, rows_arg):
    """`function` that raises Killed once it has run with `epochs` rows in its argument at
    position `rows_arg`."""
    def wrapper(*args):
        function(*args)
        if len(args[rows_arg]) == epochs:
            raise Killed
    return wrapper


@pytest.mark.parametrize('device', DEVICES)
def test_resume_after_a_kill_at_any_point_reproduces_the_whole_run(cifar_root, tmp_path,
                                                                    monkeypatch, device):
    args = (*RESUME_ARGS, f'--device={device}')
    whole = mc.main(central_args(cifar_root, tmp_path, *args, name='whole'))
    expected = without_timings(rows(whole))
    assert [row['frozen'] for row in expected] == [False, False, True, True]

    real_update = utils.quped_update
    calls = []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # 4 batches per epoch: the second batch of epoch 2
            raise Killed
        return real_update(*args, **kwargs)

    kills = {  # name: (module, attribute, replacement, metrics.jsonl rows left by the kill)
        'after_last_pt': (mc, 'save', killed_after(mc.save, 1, rows_arg=3), 0),
        'after_the_freeze': (mc, 'save', killed_after(mc.save, 3, rows_arg=3), 2),
        'after_first_row': (runs, 'write_rows', killed_after(runs.write_rows, 1, rows_arg=1), 1),
        'mid_epoch': (utils, 'quped_update', killed_in_epoch_2, 1)}
    for name, (module, attribute, replacement, rows_left) in kills.items():
        with monkeypatch.context() as patch:
            patch.setattr(module, attribute, replacement)
            with pytest.raises(Killed):
                mc.main(central_args(cifar_root, tmp_path, *args, name=name))
        folder = tmp_path / 'results' / name
        shown = rows(folder) if (folder / 'metrics.jsonl').exists() else []
        assert len(shown) == rows_left
        assert torch.load(folder / 'last.pt', weights_only=True)['epoch'] >= len(shown)
        mc.main([f'--resume={folder}'])
        assert without_timings(rows(folder)) == expected, name
        last, ref = (torch.load(os.path.join(f, 'last.pt'), weights_only=True)
                     for f in (folder, whole))
        assert all(torch.equal(last['model'][k], ref['model'][k]) for k in ref['model'])
        for best in ('best_fp.pt', 'best_quantized.pt'):
            ours, theirs = (torch.load(os.path.join(f, best), weights_only=True)
                            for f in (folder, whole))
            assert ours['epoch'] == theirs['epoch'], (name, best)
            assert all(torch.equal(ours['state_dict'][k], theirs['state_dict'][k])
                       for k in theirs['state_dict']), (name, best)
        for filename, key in mc.LOGS.items():
            with open(folder / filename) as f:
                assert json.load(f) == [row[key] for row in expected]


SIGINT_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
import main_centralized
main_centralized.main(sys.argv[2:])
"""


def test_ctrl_c_names_the_resume_command_and_keeps_the_last_epoch(cifar_root, tmp_path):
    """SIGINT to a real run in its second epoch: one line that names the folder and the
    command, exit status 130, the first epoch's outputs intact, and the resumed run equal to an
    uninterrupted one."""
    args = central_args(cifar_root, tmp_path, '--EPOCHS=3', name='interrupted')
    child = subprocess.Popen([sys.executable, '-c', SIGINT_RUN, str(ROOT), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.startswith('epoch   1/3'):
                break
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        stop(child)
    folder = tmp_path / 'results' / 'interrupted'
    assert child.returncode == runtime.INTERRUPTED
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith(f'python main_centralized.py --resume={folder}')
    assert 'keeps epochs 1-1' in err
    kept = rows(folder)
    assert [row['epoch'] for row in kept] == [1]
    mc.main([f'--resume={folder}'])
    whole = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=3', name='whole'))
    assert without_timings(rows(folder)) == without_timings(rows(whole))


def test_ctrl_c_in_the_first_epoch_resumes_from_the_start(cifar_root, tmp_path, monkeypatch,
                                                          capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(utils, 'quped_update', interrupt)
        with pytest.raises(SystemExit) as exit_info:
            mc.main(central_args(cifar_root, tmp_path, name='early'))
    assert exit_info.value.code == runtime.INTERRUPTED
    folder = tmp_path / 'results' / 'early'
    assert 'no epoch had ended yet' in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == ['.lock', 'config.json']
    mc.main([f'--resume={folder}'])
    whole = mc.main(central_args(cifar_root, tmp_path, name='whole'))
    assert without_timings(rows(folder)) == without_timings(rows(whole))


def test_resume_refuses_changed_hyperparameters_and_missing_runs(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path))
    before = digests(folder)
    fails_with(capsys, [f'--resume={folder}', '--lambda_coef=1e-3'], 'lambda_coef',
               'keeps its configuration')
    fails_with(capsys, [f'--resume={tmp_path}'], 'no run there')
    assert digests(folder) == before
    mc.main([f'--resume={folder}', '--EPOCHS=3'])  # extending a run is allowed
    assert [row['epoch'] for row in rows(folder)] == [1, 2, 3]


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize('arg, phrase', [
    ('--n_centroids=1', 'n_centroids=1'), ('--EPOCHS=0', 'EPOCHS=0'),
    ('--BATCH_SIZE=0', 'BATCH_SIZE=0'), ('--lambda_coef=-1e-4', 'lambda_coef=-0.0001'),
    ('--lr2=-1e-4', 'lr2=-0.0001'), ('--weight_decay=-1.0', 'weight_decay'),
    ('--resn=21', 'resn=21'), ('--lr2_milestones=(140,80)', 'increasing'),
    ('--freeze_epoch=0', 'freeze_epoch=0')])
def test_bad_hyperparameter_values(capsys, tmp_path, arg, phrase):
    fails_with(capsys, [arg, f'--results_dir={tmp_path}'], phrase)
    assert not os.listdir(tmp_path)


def test_lr2_zero_is_valid():
    assert mc.make_config(['--lr2=0'])[0]['lr2'] == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_asked_for_without_a_gpu(capsys):
    fails_with(capsys, ['--device=cuda', '--evaluate=x.pt'], 'no usable CUDA')


def test_bad_checkpoints(cifar_root, tmp_path, capsys):
    warm = ['--cold_start=False', '--resn=20']
    fails_with(capsys, central_args(cifar_root, tmp_path, *warm,
                                f'--pretrained_path={tmp_path}/none.pt'),
               f'{tmp_path}/none.pt', 'does not exist', '--cold_start=True')
    (tmp_path / 'junk.pt').write_bytes(b'\x80\x02garbage')
    fails_with(capsys, central_args(cifar_root, tmp_path, *warm,
                                f'--pretrained_path={tmp_path}/junk.pt'), 'damaged')
    torch.save(resnet.build('resnet32').state_dict(), tmp_path / 'r32.pt')
    fails_with(capsys, central_args(cifar_root, tmp_path, *warm,
                                f'--pretrained_path={tmp_path}/r32.pt'),
               'does not fit resnet20', 'looks like a resnet32')
    assert not (tmp_path / 'results').exists()  # no run folder for a run that never started


@needs(MINI)
@needs(PRETRAINED)
@pytest.mark.parametrize('device', [pytest.param('cuda', marks=NO_CUDA)])
def test_two_epochs_of_the_default_protocol_on_real_data(tmp_path, device):
    """The headline setting (warm-started ResNet-20, 1 bit) on real images: the CPU gives
    0.70 full-precision test accuracy after epoch 1."""
    folder = mc.main([f'--data_root={MINI}', f'--results_dir={tmp_path}', '--run_name=real',
                      f'--pretrained_path={PRETRAINED}/resnet20_fp_fpinit.pt', '--EPOCHS=2',
                      f'--device={device}'])
    metrics = rows(folder)
    assert metrics[0]['test_acc'] > 0.5 and len(metrics) == 2
    assert all(math.isfinite(row['train_loss']) for row in metrics)


@needs(PRETRAINED)
def test_a_warm_start_from_an_akamaster_style_file_equals_one_from_the_authors_file(cifar_root,
                                                                                    tmp_path):
    """akamaster's layout (under 'state_dict', 'module.' keys, no BatchNorm counters), made
    from the authors' ResNet-20 since akamaster's own file cannot be downloaded here, trains as
    the authors' file does, and not as a cold start."""
    authors = PRETRAINED / 'resnet20_fp_fpinit.pt'
    state = resnet.read_state_dict(authors)
    old = {f'module.{k}': v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    torch.save({'state_dict': old, 'best_prec1': 91.73}, tmp_path / 'resnet20-12fca82f.th')
    starts = {'aka': ('--cold_start=False', f'--pretrained_path={tmp_path}/resnet20-12fca82f.th'),
              'authors': ('--cold_start=False', f'--pretrained_path={authors}'),
              'cold': ('--cold_start=True',)}
    got = {name: without_timings(rows(mc.main(central_args(
        cifar_root, tmp_path, '--resn=20', '--EPOCHS=1', *start, name=name))))
        for name, start in starts.items()}
    assert got['aka'] == got['authors'] != got['cold']


def test_offline_download_of_the_warm_start_explains_what_to_do(cifar_root, tmp_path, capsys,
                                                               monkeypatch):
    name, _, digest = resnet.PUBLISHED[20]
    monkeypatch.setitem(resnet.PUBLISHED, 20, (name, 'http://127.0.0.1:9/resnet20.pt', digest))
    monkeypatch.setattr(resnet, 'PRETRAINED_DIR', str(tmp_path / 'pretrained'))
    fails_with(capsys, central_args(cifar_root, tmp_path, '--cold_start=False', '--resn=20'),
               'could not be downloaded from http://127.0.0.1:9/resnet20.pt',
               str(tmp_path / 'pretrained' / name), digest)
    assert not (tmp_path / 'pretrained' / name).exists()


def test_offline_download_of_cifar10_explains_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, 'URL', 'http://127.0.0.1:9/cifar-10-python.tar.gz')
    fails_with(capsys, central_args(tmp_path / 'empty', tmp_path),
               'could not be downloaded from http://127.0.0.1:9/cifar-10-python.tar.gz',
               str(tmp_path / 'empty'), 'tar xzf')


def test_incomplete_or_malformed_data(cifar_root, tmp_path, capsys):
    folder = cifar_root / 'cifar-10-batches-py'
    batch3 = (folder / 'data_batch_3').read_bytes()
    (folder / 'data_batch_3').unlink()
    fails_with(capsys, central_args(cifar_root, tmp_path), 'lacks data_batch_3')
    write_batch(folder / 'data_batch_3', np.zeros((40, 3, 16, 16), np.uint8), [0] * 40)
    fails_with(capsys, central_args(cifar_root, tmp_path), 'data_batch_3 is malformed')
    (folder / 'data_batch_3').write_bytes(batch3[:1000])
    fails_with(capsys, central_args(cifar_root, tmp_path), 'data_batch_3 is not a readable')


def test_data_root_that_is_a_file(tmp_path, capsys):
    (tmp_path / 'cifar.tar.gz').write_bytes(b'not a folder')
    fails_with(capsys, central_args(tmp_path / 'cifar.tar.gz', tmp_path), 'is a file, not a folder',
               '--data_root')
    assert sorted(os.listdir(tmp_path)) == ['cifar.tar.gz']


@pytest.mark.parametrize('batch_size', [1])
def test_batch_size_with_no_trainable_batch(cifar_root, tmp_path, capsys, batch_size):
    fails_with(capsys, central_args(cifar_root, tmp_path, f'--BATCH_SIZE={batch_size}'),
               f'BATCH_SIZE={batch_size} leaves no batch', 'BatchNorm')
    assert not (tmp_path / 'results').exists()


def test_existing_run_folder_is_never_overwritten(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path))
    before = digests(folder)
    fails_with(capsys, central_args(cifar_root, tmp_path), 'already holds a run', '--resume=')
    assert digests(folder) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_epoch(cifar_root, tmp_path, capsys,
                                                             monkeypatch):
    real_schedule = training.protocol_schedule

    def exploding_from_epoch_2(cfg, epoch):
        s = real_schedule(cfg, epoch)
        return {**s, 'lr2': math.inf} if epoch >= 1 else s
    monkeypatch.setattr(training, 'protocol_schedule', exploding_from_epoch_2)
    message = fails_with(capsys, central_args(cifar_root, tmp_path, '--EPOCHS=3'))
    assert 'non-finite in epoch 2' in message and 'outputs of epoch 1' in message
    folder = tmp_path / 'results' / 'run'
    assert [row['epoch'] for row in rows(folder)] == [1]
    last = torch.load(folder / 'last.pt', weights_only=True)
    assert last['epoch'] == 1 and torch.isfinite(last['centers']).all()


# --- the variants of a run ---------------------------------------------------------------------


def test_whole_runs_with_l2_fixed_centers_and_weight_decay(cifar_root, tmp_path):
    base = rows(mc.main(central_args(cifar_root, tmp_path, '--lambda_coef=1e-2', name='l1')))
    l2 = rows(mc.main(central_args(cifar_root, tmp_path, '--lambda_coef=1e-2', '--l1=False',
                               '--n_centroids=4', name='l2')))
    assert all(math.isfinite(r['train_loss']) for r in l2)
    assert all(row == sorted(row) for r in l2 for row in r['centers'])
    assert l2[0]['centers'] != l2[1]['centers'] and l2[-1]['q_test_acc'] >= 0
    fixed = rows(mc.main(central_args(cifar_root, tmp_path, '--lr2=0', name='fixed')))
    assert all(row == [-1.0, 1.0] for r in fixed for row in r['centers'])  # ProxQuant's +-1
    assert fixed != base
    decayed = mc.main(central_args(cifar_root, tmp_path, '--adam=False', '--weight_decay=5e-4',
                               name='decayed'))
    plain = mc.main(central_args(cifar_root, tmp_path, '--adam=False', name='plain'))
    last = torch.load(os.path.join(decayed, 'last.pt'), weights_only=True)
    assert last['optimizer']['param_groups'][0]['weight_decay'] == 5e-4
    assert without_timings(rows(decayed)) != without_timings(rows(plain))


def test_a_run_with_the_released_regulariser_sign_says_what_it_does(cifar_root, tmp_path, capsys):
    mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1', name='released'))
    assert 'center_reg_fix=False keeps the released' in capsys.readouterr().out
    mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1', '--center_reg_fix=True', name='fixed'))
    assert 'center_reg_fix=False' not in capsys.readouterr().out


# --- full-precision runs -------------------------------------------------------------------------

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


# --- what a user watches -------------------------------------------------------------------------

def test_console_lines_are_short_and_labelled(cifar_root, tmp_path, capsys):
    mc.main(central_args(cifar_root, tmp_path, '--lr2=1.5e-4'))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith('epoch ')]
    assert all(len(line) < 160 for line in lines)
    assert all(' train ' in line and 's eval ' in line for line in lines)
    assert 'lr2 1.5e-04' in lines[0] and 'quirk 5' in out
    mf.main(cnn_fed_args(cifar_root, tmp_path, '--algorithm=fedavg'))
    fed_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('round')]
    assert fed_lines and all('global model acc' in line and 'personalised' not in line
                             for line in fed_lines)
