"""export.py, packing.py and plot.py: bit packing round trips, exported models equal to their
checkpoints on real images, the file's size against the arithmetic, damaged files, and the
figures of real runs."""
import json
import os

import pytest
import torch

import data
import export
import main_centralized as mc
import main_federated as mf
import packing
import resnet
import runs
import runtime
import utils
from conftest import (MINI, central_args, cnn_fed_args, digests, exits_with_error, needs,
                      refuse_writes, run_folder)


def check_export(root, tmp_path, capsys, source, n):
    """The packed file's logits equal those of the model its source stands for: the model
    load_model() gives for best_quantized.pt; Q_c(x) of the trained model for last.pt. Its
    accuracy is the one the run logged for that epoch's quantized model."""
    folder = run_folder(root, tmp_path, f'--n_centroids={n}')
    path = os.path.join(folder, source)
    capsys.readouterr()
    result = export.main([path])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result and printed['path'] == path + '.packed'
    packed, info = runs.load_model(path + '.packed')
    cifar = data.load_cifar10(root, 'cpu')
    x = data.normalize(cifar['test_x'][:500])
    if source == 'best_quantized.pt':
        original, _ = runs.load_model(path)
    else:
        last = torch.load(path, weights_only=True)
        original = resnet.build('resnet8')
        original.load_state_dict(last['model'])
        weights = utils.QuantizedWeights(original)
        original.load_state_dict({**last['model'], **utils.quantized_state(
            weights, last['centers'], last['config']['l1'])})
        original.eval()
    with torch.no_grad():
        assert torch.equal(packed(x), original(x))
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    logged = rows[info['epoch'] - 1]['q_test_acc']
    assert runtime.evaluate(packed, cifar['test_x'], cifar['test_y'])[1] == logged
    mc.main([f'--evaluate={path}.packed', f'--data_root={root}'])
    assert f"test accuracy {logged:.4f}" in capsys.readouterr().out


EXPORTS = [('best_quantized.pt', 2), ('best_quantized.pt', 3), ('last.pt', 4)]
REAL_EXPORTS = [EXPORTS[0], EXPORTS[2]]  # both sources on real images (25 s a run); all three on
# synthetic ones


@needs(MINI)
@pytest.mark.parametrize('source, n', REAL_EXPORTS)
def test_exported_model_equals_its_checkpoint_on_real_images(tmp_path, capsys, source, n):
    check_export(MINI, tmp_path, capsys, source, n)


@pytest.mark.parametrize('source, n', EXPORTS)
def test_exported_model_equals_its_checkpoint_on_synthetic_images(cifar_root, tmp_path, capsys,
                                                                  source, n):
    check_export(cifar_root, tmp_path, capsys, source, n)


def test_export_refuses_what_holds_no_quantized_model(tmp_path, capsys):
    torch.save(resnet.build('resnet8').state_dict(), tmp_path / 'plain.pt')
    exits_with_error(capsys, export.main, [str(tmp_path / 'plain.pt')], 'holds no centers')


def test_federated_clients_export_one_file_each(cifar_root, tmp_path, capsys):
    folder = mf.main([f'--data_root={cifar_root}', f'--results_dir={tmp_path}', '--run_name=f',
                      '--n_clients=3', '--classes_per_client=5', '--rounds=1',
                      '--BATCH_SIZE=20', '--client_archs=(resnet8,cifarnet)',
                      '--global_arch=resnet8', '--client_bits=(1,0,2)'])
    path = os.path.join(folder, 'best.pt')
    capsys.readouterr()
    export.main([path])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [os.path.basename(c['path']) for c in last['clients']] == [
        'best.pt.client0.packed', 'best.pt.client2.packed']  # client 1 is full precision
    x = torch.randn(8, 3, 32, 32)
    for client in (0, 2):
        packed, _ = packing.load_packed(f'{path}.client{client}.packed')
        original, _ = runs.load_client_model(path, client)
        with torch.no_grad():
            assert torch.equal(packed(x), original(x))


# --- checkpoints it cannot pack -----------------------------------------------------------------

@pytest.mark.parametrize('content, phrase', [
    ({'centers': torch.zeros(2, 2), 'config': {}}, 'is not a checkpoint of this project'),
    ({'clients': [{'centers': torch.zeros(2)}], 'global': None, 'round': 1},
     'is not a checkpoint of this project'),
    ({'centers': torch.zeros(2, 2), 'config': {'EPOCHS': 2}}, "KeyError: 'resn'"),
    ({'kind': 'centralized', 'config': {'EPOCHS': 2}, 'centers': None}, 'holds no centers'),
    ([1, 2, 3], 'is not a checkpoint of this project'),
])
def test_hand_made_checkpoints_are_named_not_tracebacks(tmp_path, capsys, content, phrase):
    path = tmp_path / 'made.pt'
    torch.save(content, path)
    exits_with_error(capsys, export.main, [str(path)], str(path), phrase)
    assert os.listdir(tmp_path) == ['made.pt']


def test_a_checkpoint_whose_config_names_another_architecture_is_named(cifar_root, tmp_path,
                                                                        capsys):
    folder = run_folder(cifar_root, tmp_path)
    checkpoint = torch.load(os.path.join(folder, 'best_quantized.pt'), weights_only=True)
    checkpoint['config']['resn'] = 20
    path = tmp_path / 'edited.pt'
    torch.save(checkpoint, path)
    exits_with_error(capsys, export.main, [str(path)], str(path), 'does not fit resnet20',
                     'was edited or belongs to another run')


def test_an_unreadable_checkpoint_is_called_unreadable_not_damaged(cifar_root, tmp_path, capsys,
                                                                    monkeypatch):
    folder = run_folder(cifar_root, tmp_path)
    path = os.path.join(folder, 'best_quantized.pt')

    def denied(file, *args, **kwargs):  # what open() raises for a file without read access
        raise PermissionError(13, 'Permission denied', file)  # (root reads every file)
    monkeypatch.setattr(torch, 'load', denied)
    for main, argv in ((export.main, [path]), (mc.main, [f'--evaluate={path}']),
                       (mc.main, [f'--resume={folder}'])):
        message = exits_with_error(capsys, main, argv, 'cannot be read: permission denied',
                                   'chmod u+r')
        assert 'damaged' not in message
    with pytest.raises(resnet.CheckpointError, match='permission denied'):
        runs.load_model(path)


# --- federated checkpoints -----------------------------------------------------------------------

def test_export_packs_every_client_of_a_federated_last_pt(cifar_root, tmp_path, capsys):
    folder = mf.main(cnn_fed_args(cifar_root, tmp_path, '--client_bits=(1,0,2)'))
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
        weights = utils.QuantizedWeights(model, utils.cnet_rule(model))
        quantized = resnet.build('cifarnet')
        quantized.load_state_dict({**model.state_dict(), **utils.quantized_state(
            weights, checkpoint['clients'][client]['centers'], cfg['l1'])})
        packed, _ = packing.load_packed(f'{last}.client{client}.packed')
        with torch.no_grad():
            assert torch.equal(packed(x), quantized.eval()(x))


# --- unwritable places ---------------------------------------------------------------------------

def test_export_into_an_unwritable_folder_writes_nothing(cifar_root, tmp_path, capsys,
                                                        monkeypatch):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    before = digests(folder)
    refuse_writes(monkeypatch, folder)
    exits_with_error(capsys, export.main, [os.path.join(folder, 'best_quantized.pt')],
                     'cannot write the packed file', 'Permission denied')
    assert digests(folder) == before
