import os
import pickle
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
