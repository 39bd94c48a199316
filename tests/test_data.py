"""data.py: batch files that are wrong in ways a hand or a tool makes them, and data_root links
that lead nowhere, each a DataError that says what was found."""
import os
import pickle

import numpy as np
import pytest

import data
import main_centralized as mc
from conftest import exits_with_error


def rewrite_labels(path, labels):
    with open(path, 'rb') as f:
        batch = pickle.load(f, encoding='latin1')
    batch['labels'] = labels
    with open(path, 'wb') as f:
        pickle.dump(batch, f)


def test_fractional_labels_are_refused_not_truncated(cifar_root):
    path = cifar_root / 'cifar-10-batches-py' / 'data_batch_2'
    rewrite_labels(path, [3.5] + [1] * 39)
    with pytest.raises(data.DataError, match=r'data_batch_2 is not a readable CIFAR-10 batch.*'
                                             r'not whole numbers, e.g. 3.5'):
        data.load_cifar10(cifar_root, 'cpu')


def test_labels_out_of_range_are_shown_with_the_range_found(cifar_root):
    path = cifar_root / 'cifar-10-batches-py' / 'test_batch'
    rewrite_labels(path, list(np.arange(40) % 12))
    with pytest.raises(data.DataError, match='40 labels from 0 to 11'):
        data.load_cifar10(cifar_root, 'cpu')


@pytest.mark.parametrize('target', ['missing', 'loop'])
def test_a_data_root_link_that_leads_nowhere_is_named(tmp_path, capsys, target):
    link = tmp_path / 'data'
    os.symlink(tmp_path / 'missing' if target == 'missing' else link, link)
    exits_with_error(capsys, mc.main, [f'--data_root={link}', f'--results_dir={tmp_path}/r',
                                       '--resn=8', '--cold_start=True'],
                     'is a symbolic link that leads nowhere', '--data_root')
    assert not (tmp_path / 'r').exists()
