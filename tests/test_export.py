"""export.py, packing.py and plot.py: bit packing round trips, exported models equal to their
checkpoints on real images, the file's size against the arithmetic, damaged files, and the
figures of real runs."""
import io
import json
import os
import struct

import pytest
import torch

import data
import export
import main_centralized as mc
import federated
import main_federated as mf
import packing
import plot
import resnet
import runtime
import utils
from conftest import MINI, exits_with_error, needs


@pytest.mark.parametrize('n', [2, 3, 4, 8, 16])
@pytest.mark.parametrize('count', [1, 7, 9, 1000, 2305])
def test_bits_round_trip(n, count):
    generator = torch.Generator().manual_seed(n * count)
    indices = torch.randint(0, n, (count,), generator=generator)
    bits = packing.index_bits(n)
    packed = packing.pack_bits(indices, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count * bits // 8)
    assert torch.equal(packing.unpack_bits(packed, count, bits), indices)


def test_index_bits():
    assert [packing.index_bits(n) for n in (2, 3, 4, 5, 8, 9, 16)] == [1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize('arch, n', [('resnet8', 3), ('cifarnet', 8), ('resnet20', 2)])
def test_pack_unpack_round_trip(arch, n):
    torch.manual_seed(0)
    model = resnet.build(arch)
    state = model.state_dict()
    names = [k for k, v in state.items() if v.dim() == 4][1:]
    centers = torch.randn(len(names), n).sort(1).values
    indices = {name: torch.randint(0, n, state[name].shape) for name in names}
    obj = packing.pack(arch, state, indices, centers)
    got_arch, got, got_centers = packing.unpack(obj)
    assert got_arch == arch and torch.equal(got_centers, centers)
    for row, name in enumerate(names):
        assert torch.equal(got[name], centers[row][indices[name]])
    assert all(torch.equal(got[k], v) for k, v in state.items() if k not in indices)


def run_folder(root, tmp_path, *extra, name='run'):
    return mc.main([f'--data_root={root}', f'--results_dir={tmp_path}', f'--run_name={name}',
                    '--resn=8', '--cold_start=True', '--EPOCHS=2', '--BATCH_SIZE=128',
                    '--lambda_coef=2e-2', *extra])


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
    packed, info = mc.load_model(path + '.packed')
    cifar = data.load_cifar10(root, 'cpu')
    x = data.normalize(cifar['test_x'][:500])
    if source == 'best_quantized.pt':
        original, _ = mc.load_model(path)
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


@needs(MINI)
@pytest.mark.parametrize('source, n', EXPORTS)
def test_exported_model_equals_its_checkpoint_on_real_images(tmp_path, capsys, source, n):
    check_export(MINI, tmp_path, capsys, source, n)


@pytest.mark.parametrize('source, n', EXPORTS)
def test_exported_model_equals_its_checkpoint_on_synthetic_images(cifar_root, tmp_path, capsys,
                                                                  source, n):
    check_export(cifar_root, tmp_path, capsys, source, n)


def container_bytes():
    buffer = io.BytesIO()
    torch.save({'blob': torch.zeros(0, dtype=torch.uint8)}, buffer)
    return len(buffer.getvalue())


@pytest.mark.parametrize('arch, n', [('resnet20', 2), ('resnet20', 4), ('resnet32', 2)])
def test_packed_size_is_the_arithmetic(tmp_path, arch, n):
    """bits x weights / 8 + 4 x (centers + full-precision values) + torch's container, within
    1 KB (the metadata)."""
    torch.manual_seed(0)
    model = resnet.build(arch)
    state = model.state_dict()
    names = [k for k, v in state.items() if v.dim() == 4][1:]
    indices = {name: torch.randint(0, n, state[name].shape) for name in names}
    path = tmp_path / 'model.packed'
    runtime.save_torch(path, packing.pack(arch, state, indices, torch.randn(len(names), n)))
    weights = sum(state[name].numel() for name in names)
    rest = sum(v.numel() for k, v in state.items() if k not in indices and v.is_floating_point())
    arithmetic = (-(-weights * packing.index_bits(n) // 8) + 4 * (rest + len(names) * n)
                  + container_bytes())
    assert 0 <= os.path.getsize(path) - arithmetic < 1024
    if arch == 'resnet20' and n == 2:
        assert os.path.getsize(path) < 52_000  # about 1 bit per weight: 1.1 MB in float32


def test_damaged_packed_files_give_a_clear_error(cifar_root, tmp_path, capsys):
    folder = run_folder(cifar_root, tmp_path)
    path = os.path.join(folder, 'best_quantized.pt')
    export.main([path])
    good = open(path + '.packed', 'rb').read()
    open(tmp_path / 'truncated.packed', 'wb').write(good[:len(good) // 2])
    with pytest.raises(resnet.CheckpointError, match='could not be read'):
        packing.load_packed(tmp_path / 'truncated.packed')
    obj = torch.load(path + '.packed', weights_only=True)
    for label, change in (('short blob', {'blob': obj['blob'][:-10]}), ('version', {'version': 9}),
                          ('arch', {'arch': 'resnet20'}), ('no bits', {'bits': None})):
        runtime.save_torch(tmp_path / 'bad.packed', {**obj, **change})
        with pytest.raises(resnet.CheckpointError, match='is damaged'):
            packing.load_packed(tmp_path / 'bad.packed')
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        mc.main([f'--evaluate={tmp_path}/truncated.packed', f'--data_root={cifar_root}'])
    assert exit_info.value.code == 2 and 'Traceback' not in capsys.readouterr().err


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
        original, _ = federated.load_client_model(path, client)
        with torch.no_grad():
            assert torch.equal(packed(x), original(x))


# --- plots -------------------------------------------------------------------------------------

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
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'no completed epoch' in err and 'Traceback' not in err


@pytest.mark.parametrize('content, phrase', [
    ({'centers': torch.zeros(2, 2), 'config': {}}, "KeyError: 'resn'"),
    ({'clients': [{'centers': torch.zeros(2)}], 'global': None, 'round': 1}, 'KeyError'),
    ([1, 2, 3], 'holds no centers'),
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
        mc.load_model(path)
