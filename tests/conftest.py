import errno
import hashlib
import json
import os
import pickle
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get('QUPED_SHARED_DIR', ROOT / '..' / 'shared'))
MINI = SHARED / 'data' / 'cifar10-mini'
PRETRAINED = SHARED / 'reference' / 'pretrained'


def write_batch(path, images, labels):
    """One batch file in the standard CIFAR-10 python format."""
    with open(path, 'wb') as f:
        pickle.dump({'batch_label': path.name, 'labels': [int(v) for v in labels],
                     'data': images.reshape(len(labels), -1),
                     'filenames': [f'{i}.png' for i in range(len(labels))]}, f)


@pytest.fixture
def cifar_root(tmp_path):
    """A small data set in the standard format: 5 x 40 training and 40 test images whose
    pixels depend on their class, so that a model can learn something."""
    folder = tmp_path / 'data' / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        labels = rng.integers(0, 10, 40)
        base = (labels[:, None, None, None] * 25).astype(np.int64)
        noise = rng.integers(0, 30, (40, 3, 32, 32))
        write_batch(folder / name, (base + noise).clip(0, 255).astype(np.uint8), labels)
    return tmp_path / 'data'


def needs(path):
    return pytest.mark.skipif(not Path(path).exists(), reason=f'{path} is absent')


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA GPU on this machine')
DEVICES = ['cpu', pytest.param('cuda', marks=NO_CUDA)]  # tests that matter on a GPU run on both


def exits_with_error(capsys, main, argv, *phrases):
    """main(argv) ends with a one-paragraph error naming every phrase, exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith('error: ') and 'Traceback' not in message
    for phrase in phrases:
        assert phrase in message, message
    return message


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in the run catches it."""


def kill_after_round(patch, rounds):
    """Make federated.write_checkpoints raise Killed once it has written the checkpoints of
    `rounds` rounds (one call a round) of a new run, as a kill right after last.pt would stop
    it."""
    import federated
    real, written = federated.write_checkpoints, []

    def killed(files):
        real(files)
        written.append(1)
        if len(written) == rounds:
            raise Killed
    patch.setattr(federated, 'write_checkpoints', killed)


def assert_same_best(folder, expected):
    """Two federated runs' best.pt hold the same round, client models and global model (none
    for `local`), bit for bit."""
    ours, theirs = (torch.load(os.path.join(f, 'best.pt'), weights_only=True)
                    for f in (folder, expected))
    assert ours['round'] == theirs['round']
    for a, b in zip(ours['clients'], theirs['clients'], strict=True):
        assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in b['state_dict'])
    assert (ours['global'] is None) == (theirs['global'] is None)
    if theirs['global'] is not None:
        assert all(torch.equal(ours['global']['state_dict'][k], v)
                   for k, v in theirs['global']['state_dict'].items())


# --- helpers the test files share ----------------------------------------------------------------

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


def cnn_fed_args(cifar_root, tmp_path, *extra, name='fed'):
    return [f'--data_root={cifar_root}', f'--results_dir={tmp_path / "results"}',
            f'--run_name={name}', '--n_clients=3', '--classes_per_client=5', '--rounds=2',
            '--BATCH_SIZE=20', '--client_archs=(cifarnet,)', '--global_arch=cifarnet', *extra]


def rows(folder):
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


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


def stop(child):
    """Kill a test's subprocess by its PID if it still runs, and reap it."""
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    for stream in (child.stdout, child.stderr):
        if stream is not None:
            stream.close()


def run_folder(root, tmp_path, *extra, name='run'):
    """A two-epoch ResNet-8 run of main_centralized.py in tmp_path; returns its folder."""
    import main_centralized as mc
    return mc.main([f'--data_root={root}', f'--results_dir={tmp_path}', f'--run_name={name}',
                    '--resn=8', '--cold_start=True', '--EPOCHS=2', '--BATCH_SIZE=128',
                    '--lambda_coef=2e-2', *extra])
