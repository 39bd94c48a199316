"""resnet.py: architectures, parameter counts and the strict checkpoint loader."""
import pytest
import torch

import data
import main_centralized as mc
import resnet
from conftest import MINI, PRETRAINED, needs


@pytest.mark.parametrize('arch, count', [('resnet8', 75_290), ('resnet20', 269_722),
                                         ('resnet32', 464_154), ('resnet56', 853_018)])
def test_parameter_counts(arch, count):
    assert sum(p.numel() for p in resnet.build(arch).parameters()) == count


def test_forward_shape_and_authors_parameter_names():
    model = resnet.build('resnet20')
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    names = list(model.state_dict())
    assert names[:3] == ['conv1.weight', 'bn1.weight', 'bn1.bias']
    assert 'layer1.0.conv1.weight' in names and names[-2:] == ['linear.weight', 'linear.bias']


def test_unknown_architecture():
    with pytest.raises(ValueError, match='resnet20'):
        resnet.build('resnet21')


@pytest.mark.parametrize('wrap', ['bare', 'state_dict', 'model', 'module'])
def test_loader_accepts_the_usual_layouts(tmp_path, wrap):
    torch.manual_seed(0)
    source = resnet.build('resnet8')
    state = source.state_dict()
    obj = {'bare': state, 'state_dict': {'state_dict': state, 'epoch': 3},
           'model': {'model': state},
           'module': {'state_dict': {f'module.{k}': v for k, v in state.items()}}}[wrap]
    torch.save(obj, tmp_path / 'ckpt.pt')
    target = resnet.build('resnet8')
    resnet.load_checkpoint(target, tmp_path / 'ckpt.pt', 'resnet8')
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items())


def test_loader_names_file_architecture_and_mismatch(tmp_path):
    torch.save(resnet.build('resnet32').state_dict(), tmp_path / 'r32.pt')
    with pytest.raises(resnet.CheckpointError) as err:
        resnet.load_checkpoint(resnet.build('resnet20'), tmp_path / 'r32.pt', 'resnet20')
    message = str(err.value)
    assert 'r32.pt' in message and 'resnet20' in message and 'unexpected keys' in message
    assert 'looks like a resnet32' in message


def test_loader_reports_wrong_shapes_and_missing_keys(tmp_path):
    state = resnet.build('resnet8').state_dict()
    state['linear.weight'] = torch.zeros(100, 64)
    del state['bn1.bias']
    torch.save(state, tmp_path / 'bad.pt')
    with pytest.raises(resnet.CheckpointError, match=r'missing keys: bn1.bias.*linear.weight'):
        resnet.load_checkpoint(resnet.build('resnet8'), tmp_path / 'bad.pt', 'resnet8')


def test_loader_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(resnet.CheckpointError, match='does not exist'):
        resnet.read_state_dict(tmp_path / 'nothing.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint at all')
    with pytest.raises(resnet.CheckpointError, match='damaged'):
        resnet.read_state_dict(tmp_path / 'junk.pt')
    torch.save([1, 2, 3], tmp_path / 'list.pt')
    with pytest.raises(resnet.CheckpointError, match='holds no state_dict'):
        resnet.read_state_dict(tmp_path / 'list.pt')


@needs(PRETRAINED)
@needs(MINI)
@pytest.mark.parametrize('arch, filename, floor', [
    ('resnet20', 'resnet20_fp_fpinit.pt', 0.91), ('resnet32', 'resnet32_fp_sgd1init.pt', 0.92)])
def test_authors_checkpoints_load_strictly_and_classify_real_images(arch, filename, floor):
    model = resnet.build(arch)
    resnet.load_checkpoint(model, PRETRAINED / filename, arch)  # legacy format, CUDA tensors
    cifar = data.load_cifar10(MINI, 'cpu')
    _, accuracy = mc.evaluate_model(model, cifar['test_x'], cifar['test_y'])
    assert cifar['test_y'].shape[0] == 1017
    assert accuracy >= floor
