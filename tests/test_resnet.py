"""resnet.py: architectures, parameter counts and the strict checkpoint loader."""
import pytest
import torch

import data
import literal_reference
import resnet
import runtime
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


@pytest.mark.parametrize('arch', ['resnet8', 'resnet20', 'resnet32'])
@pytest.mark.parametrize('training', [True, False])
def test_outputs_and_gradients_equal_the_authors_architecture_bit_for_bit(arch, training):
    torch.manual_seed(0)
    ours = resnet.build(arch).train(training)
    theirs = literal_reference.build(arch).train(training)
    state = ours.state_dict()
    for k, v in state.items():  # non-trivial BatchNorm statistics and affine parameters
        if v.is_floating_point() and 'bn' in k:
            v.copy_(torch.rand_like(v) + 0.5 if k.endswith(('var', 'weight')) else
                    torch.randn_like(v) * 0.1)
    theirs.load_state_dict(state)
    x = torch.randn(16, 3, 32, 32)
    out_ours, out_theirs = ours(x), theirs(x)
    assert torch.equal(out_ours, out_theirs)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_resnet_pools_as_the_authors_not_as_the_old_adaptive_pooling():
    """Why the architecture test asks for bit equality: adaptive pooling computes the same mean
    in another order (the gap that moved whole trajectories); resnet.py is the window's."""
    torch.manual_seed(0)
    ours = resnet.build('resnet20')
    adaptive = literal_reference.build('resnet20', pooling='adaptive')
    adaptive.load_state_dict(ours.state_dict())
    x = torch.randn(64, 3, 32, 32)
    assert not torch.equal(ours(x), adaptive(x))
    assert torch.allclose(ours(x), adaptive(x), rtol=0, atol=1e-5)


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


def test_loader_fills_batch_counters_missing_from_old_checkpoints(tmp_path):
    """akamaster's files (PyTorch 0.3 era): under 'state_dict', 'module.' keys, and no
    num_batches_tracked, which BatchNorm fills with 0 when it loads such a file itself."""
    torch.manual_seed(0)
    source = resnet.build('resnet20')
    old = {f'module.{k}': v for k, v in source.state_dict().items()
           if not k.endswith('num_batches_tracked')}
    torch.save({'state_dict': old, 'best_prec1': 91.73}, tmp_path / 'resnet20-12fca82f.th')
    target = resnet.build('resnet20')
    for m in target.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.fill_(7)
    resnet.load_checkpoint(target, tmp_path / 'resnet20-12fca82f.th', 'resnet20')
    for k, v in target.state_dict().items():
        want = torch.tensor(0) if k.endswith('num_batches_tracked') else source.state_dict()[k]
        assert torch.equal(v, want), k
    reference = resnet.build('resnet20')
    reference.load_state_dict({k.removeprefix('module.'): v for k, v in old.items()},
                              strict=False)  # what BatchNorm itself does with such a file
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in target.state_dict().items())


def test_loader_stays_strict_about_running_statistics(tmp_path):
    state = resnet.build('resnet8').state_dict()
    del state['layer1.0.bn1.running_var']
    torch.save(state, tmp_path / 'no_var.pt')
    with pytest.raises(resnet.CheckpointError, match='missing keys: layer1.0.bn1.running_var'):
        resnet.load_checkpoint(resnet.build('resnet8'), tmp_path / 'no_var.pt', 'resnet8')


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
@pytest.mark.parametrize('arch, filename, correct', [
    ('resnet20', 'resnet20_fp_fpinit.pt', 941), ('resnet32', 'resnet32_fp_sgd1init.pt', 951)])
def test_authors_checkpoints_load_strictly_and_classify_real_images(arch, filename, correct):
    """The README's 92.53 % and 93.51 %: 941 and 951 of the 1,017 test images."""
    model = resnet.build(arch)
    resnet.load_checkpoint(model, PRETRAINED / filename, arch)  # legacy format, CUDA tensors
    cifar = data.load_cifar10(MINI, 'cpu')
    _, accuracy = runtime.evaluate(model, cifar['test_x'], cifar['test_y'])
    assert cifar['test_y'].shape[0] == 1017
    assert accuracy == correct / 1017
