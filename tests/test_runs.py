"""runs.py, the run folder: created once and never reused while it holds a run, locked while
a process trains it, written atomically (a kill or a full disk leaves the previous files), its
`kind` recorded and read back, resumed only by the engine that wrote it, and models loaded from
any of its checkpoints."""
import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch

import export
import main_centralized as mc
import main_federated as mf
import plot
import resnet
import runs
import runtime
from conftest import ROOT, central_args, cnn_fed_args, digests, exits_with_error, rows, stop


# --- resume --------------------------------------------------------------------------------------

def test_resuming_the_other_scripts_run_folder_is_refused(cifar_root, tmp_path, capsys):
    central = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    fed = mf.main(cnn_fed_args(cifar_root, tmp_path, '--rounds=1'))
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


def test_a_federated_folder_is_resumed_only_by_its_engine(cifar_root, tmp_path):
    fed = mf.main(cnn_fed_args(cifar_root, tmp_path, '--rounds=1'))
    cfg = mf.DEFAULTS
    with pytest.raises(runtime.ConfigError, match=r'run of main_federated.py, not of '
                       r'flower_app.py.*python main_federated.py --resume='):
        runs.resume(fed, {}, set(), 'flower', cfg, lambda cfg: None)
    with open(os.path.join(fed, 'config.json')) as f:
        saved = json.load(f)
    os.remove(os.path.join(fed, 'last.pt'))
    saved['kind'] = 'flower'
    runs.write_json(os.path.join(fed, 'config.json'), saved)
    with pytest.raises(runtime.ConfigError, match=r'run of flower_app.py \(flwr run .\), not of '
                       r'main_federated.py.*flwr run . --stream --federation-config '
                       r'"num-supernodes=3" --run-config "resume='):
        runs.resume(fed, {}, set(), 'federated', cfg, lambda cfg: None)


# --- what a folder or file is -------------------------------------------------------------------

def checkpoints_of(folder):
    return {name: torch.load(os.path.join(folder, name), weights_only=True)
            for name in sorted(os.listdir(folder)) if name.endswith('.pt')}


def written_before_the_field(record):
    return {k: v for k, v in record.items() if k not in ('kind', 'file')}


def test_every_file_of_a_run_says_what_wrote_it_and_older_files_are_recognised(cifar_root,
                                                                               tmp_path):
    central = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    fed = mf.main(cnn_fed_args(cifar_root, tmp_path, '--rounds=1'))
    expected = {central: ('centralized', {'best_fp.pt': 'best_fp', 'best_quantized.pt':
                                          'best_quantized', 'last.pt': 'last'}),
                fed: ('federated', {'best.pt': 'best', 'last.pt': 'last'})}
    for folder, (kind, files) in expected.items():
        cfg = runs.read_config(folder)
        assert cfg['kind'] == kind and runs.kind_of(written_before_the_field(cfg)) == kind
        found = checkpoints_of(folder)
        assert {name: c['file'] for name, c in found.items()} == files
        for checkpoint in found.values():
            assert checkpoint['kind'] == kind
            old = written_before_the_field(checkpoint)
            assert (runs.kind_of(old), runs.file_of(old)) == (kind, checkpoint['file'])
    flower_last = {**written_before_the_field(checkpoints_of(fed)['last.pt']), 'clients': None}
    assert runs.kind_of(flower_last) == 'flower'  # a Flower last.pt keeps no client states
    assert runs.kind_of({'script': 'main_federated.py', 'runs': {}}) == 'sweep'
    assert runs.kind_of(resnet.build('resnet8').state_dict()) is None  # a bare state_dict


def test_a_run_written_before_the_kind_field_resumes_plots_exports_and_loads(cifar_root,
                                                                              tmp_path):
    whole = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=2', name='whole'))
    old = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1', name='old'))
    runs.write_json(os.path.join(old, 'config.json'),
                    written_before_the_field(runs.read_config(old)))
    for name, checkpoint in checkpoints_of(old).items():
        torch.save(written_before_the_field(checkpoint), os.path.join(old, name))
    mc.main([f'--resume={old}', '--EPOCHS=2'])
    assert runs.read_rows(old)[1]['q_test_acc'] == runs.read_rows(whole)[1]['q_test_acc']
    assert plot.plot_run(old)
    assert export.export(os.path.join(old, 'best_quantized.pt'))['path'].endswith('.packed')
    model, info = runs.load_model(os.path.join(old, 'best_fp.pt'))
    assert info['epoch'] in (1, 2) and not model.training


@pytest.mark.parametrize('script', ['central', 'federated'])
def test_a_resume_that_shortens_a_run_is_refused(cifar_root, tmp_path, capsys, script):
    main, args, name = ((mc.main, central_args(cifar_root, tmp_path), 'EPOCHS') if
                        script == 'central' else (mf.main, cnn_fed_args(cifar_root, tmp_path),
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


# --- locking a run folder -----------------------------------------------------------------------

def test_a_run_folder_is_locked_while_a_process_trains_it(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    before = digests(folder)
    with runs.locked(folder):  # another process holding it, as far as flock goes
        exits_with_error(capsys, mc.main, [f'--resume={folder}', '--EPOCHS=2'],
                         'another process is training', folder)
    assert digests(folder) == before
    mc.main([f'--resume={folder}', '--EPOCHS=2'])  # released: it goes on
    assert len(rows(folder)) == 2


# --- writes that fail ----------------------------------------------------------------------------

def test_a_full_disk_during_a_run_keeps_every_checkpoint_at_the_last_epoch(cifar_root, tmp_path,
                                                                          capsys, monkeypatch):
    real = runs.write_together
    calls = []

    def disk_full_at_epoch_2(files):  # the second epoch's checkpoints, last.pt among them
        if any(os.fspath(path).endswith('last.pt') for path in files):
            calls.append(1)
        if len(calls) == 2 and any(os.fspath(path).endswith('last.pt') for path in files):
            raise OSError(errno.ENOSPC, 'No space left on device', next(iter(files)))
        return real(files)
    monkeypatch.setattr(runs, 'write_together', disk_full_at_epoch_2)
    args = central_args(cifar_root, tmp_path, '--EPOCHS=3', '--lambda_coef=1e-2')
    exits_with_error(capsys, mc.main, args, 'No space left on device', 'keeps epochs 1-1',
                     '--resume=')
    folder = tmp_path / 'results' / 'run'
    epochs = {name: torch.load(folder / name, weights_only=True)['epoch']
              for name in ('last.pt', 'best_fp.pt', 'best_quantized.pt')}
    assert set(epochs.values()) == {1} and [r['epoch'] for r in rows(folder)] == [1]
    assert not [f for f in os.listdir(folder) if f.startswith('.tmp-')]


# --- loading models ------------------------------------------------------------------------------

def test_load_client_model_explains_its_mistakes(cifar_root, tmp_path):
    folder = mf.main(cnn_fed_args(cifar_root, tmp_path, '--algorithm=fedavg'))
    best, last = os.path.join(folder, 'best.pt'), os.path.join(folder, 'last.pt')
    with pytest.raises(ValueError, match="client='1': give a client's index as an int"):
        runs.load_client_model(best, '1')
    with pytest.raises(resnet.CheckpointError, match="last.pt, which keeps the clients"):
        runs.load_client_model(last, 0)
    with pytest.raises(resnet.CheckpointError, match='there is no client 99'):
        runs.load_client_model(best, 99)


class Opaque:
    """An object torch.load(weights_only=True) refuses."""


def test_checkpoint_messages_say_what_the_path_is(cifar_root, tmp_path, capsys):
    exits_with_error(capsys, mc.main, [f'--evaluate={tmp_path}', f'--data_root={cifar_root}'],
                     'is a folder, not a checkpoint')
    torch.save({'model': Opaque()}, tmp_path / 'object.pt')  # an object of a class
    message = exits_with_error(capsys, mc.main, [f'--evaluate={tmp_path}/object.pt',
                                                 f'--data_root={cifar_root}'],
                               'not a checkpoint of this project')
    assert 'weights_only' not in message
    fed = mf.main(cnn_fed_args(cifar_root, tmp_path, '--rounds=1'))
    exits_with_error(capsys, mc.main, [f"--evaluate={os.path.join(fed, 'best.pt')}",
                                       f'--data_root={cifar_root}'],
                     'runs.load_client_model')


def test_load_model_of_a_packed_file_gives_its_metrics(cifar_root, tmp_path):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    export.main([os.path.join(folder, 'best_quantized.pt')])
    _, info = runs.load_model(os.path.join(folder, 'best_quantized.pt.packed'))
    assert info['metrics']['q_test_acc'] == rows(folder)[0]['q_test_acc']


# --- leftovers and errors at the start ---------------------------------------------------------

def test_a_folder_holding_only_a_lock_and_unfinished_writes_takes_a_new_run(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / '.lock').write_text('123\n')
    (folder / '.tmp-abc').write_bytes(b'x' * 100)
    assert runs.new_run_folder(str(tmp_path), 'run', 'centralized') == str(folder)
    with runs.locked(str(folder)):
        assert sorted(os.listdir(folder)) == ['.lock']  # the killed write's leftover is gone
    (folder / 'config.json').write_text('{}')
    with pytest.raises(runtime.ConfigError, match=r'already holds a run.*continue that run with: '
                       r'python main_centralized.py --resume='):
        runs.new_run_folder(str(tmp_path), 'run', 'centralized')


def test_a_full_disk_at_the_lock_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'getpid', full)
    with pytest.raises(runtime.ConfigError) as info:
        with runs.locked(str(tmp_path)):
            pass
    assert f'the disk holding {tmp_path} is full' in str(info.value)
    assert 'None' not in str(info.value)


@pytest.mark.parametrize('code, phrase', [
    (errno.ENOSPC, 'the disk holding F is full (No space left on device)'),
    (errno.EACCES, 'F cannot be written: permission denied'),
    (errno.EIO, 'Input/output error: F'),
])
def test_os_errors_are_described_with_their_folder(code, phrase):
    assert runs.describe_os_error(OSError(code, os.strerror(code)), 'F') == phrase


# --- config.json ---------------------------------------------------------------------------------

def test_config_json_records_the_commit_it_ran(cifar_root, tmp_path):
    folder = mc.main([f'--data_root={cifar_root}', f'--results_dir={tmp_path}', '--run_name=r',
                      '--resn=8', '--cold_start=True', '--EPOCHS=1', '--BATCH_SIZE=50'])
    with open(os.path.join(folder, 'config.json')) as f:
        code = json.load(f)['code']
    head = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True,
                          text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None
    assert code[0]['commit'] == expected
    assert code[0]['clean'] in (True, False, None)
    mc.main([f'--resume={folder}', '--EPOCHS=2'])  # the same code: recorded once
    with open(os.path.join(folder, 'config.json')) as f:
        assert json.load(f)['code'] == code


@pytest.mark.parametrize('edit, phrases', [
    ({'EPOCHS': 'abc'}, ["EPOCHS='abc' is not int"]),
    ({'resn': 'eight'}, ["resn='eight' is not int"]),
    ({'resn': 9}, ['resn=9 is not a CIFAR ResNet']),
])
def test_a_hand_edited_configuration_is_refused_before_anything_is_written(cifar_root, tmp_path,
                                                                          capsys, edit, phrases):
    folder = tmp_path / 'run'
    folder.mkdir()
    cfg = {**mc.DEFAULTS, 'data_root': str(cifar_root), 'resn': 8, 'cold_start': True,
           'EPOCHS': 2, 'run_name': 'run', 'results_dir': str(tmp_path), **edit}
    (folder / 'config.json').write_text(json.dumps(cfg))
    before = (folder / 'config.json').read_bytes()
    exits_with_error(capsys, mc.main, [f'--resume={folder}'], str(folder / 'config.json'),
                     'edited or damaged', *phrases)
    assert (folder / 'config.json').read_bytes() == before
    assert sorted(os.listdir(folder)) == ['config.json']


# --- atomic writes -------------------------------------------------------------------------------

WRITER = """
import sys, hashlib
sys.path.insert(0, sys.argv[1])
import runs
i = 0
while True:
    payload = str(i).encode() * 2_000_000
    runs.write_atomic(sys.argv[2], hashlib.sha256(payload).hexdigest().encode() + payload)
    if i == 0:
        print('written', flush=True)
    i += 1
"""


def test_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'log.txt'
    runs.write_atomic(path, b'first')

    def broken_replace(*args):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'replace', broken_replace)
    with pytest.raises(OSError):
        runs.write_atomic(path, b'second')
    assert path.read_bytes() == b'first' and os.listdir(tmp_path) == ['log.txt']


def test_a_kill_mid_write_leaves_a_complete_file(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    for delay in (0.05, 0.23, 0.41):
        child = subprocess.Popen([sys.executable, '-c', WRITER, str(ROOT), str(path)],
                                 stdout=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b'written\n'
            time.sleep(delay)
        finally:
            stop(child)
        content = path.read_bytes()
        digest, payload = content[:64], content[64:]
        assert hashlib.sha256(payload).hexdigest().encode() == digest
