"""KID: invariants and agreement with torchmetrics."""

import re

import pytest
import torch

from dyod.errors import DyodError
from dyod.evaluation import choose_subset_size, kid, squared_mmd


def features(n, d=16, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).double() + shift


def test_kid_of_a_set_against_itself_is_about_zero_and_a_shift_is_clearly_positive():
    x = features(300)
    same = kid(x, features(300, seed=1), subset_size=100, num_subsets=50)
    shifted = kid(x, features(300, shift=0.5, seed=1), subset_size=100, num_subsets=50)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 10 * max(same.std, abs(same.mean))
    # MMD² of a set against itself with the unbiased estimator is not exactly 0, but its expectation is
    assert abs(float(squared_mmd(x, x))) < 0.05


def test_kid_agrees_with_torchmetrics():
    import torchmetrics.image.kid as torchmetrics
    real, fake = features(120, d=8, seed=3), features(90, d=8, shift=0.3, seed=4)
    metric = torchmetrics.KernelInceptionDistance(feature=torch.nn.Identity(), subsets=7, subset_size=50)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(11)  # torchmetrics draws its subsets from the global generator; dyod from its own
    expected_mean, expected_std = metric.compute()
    ours = kid(real, fake, subset_size=50, num_subsets=7, seed=11)
    assert ours.mean == pytest.approx(float(expected_mean), rel=1e-6)
    assert ours.std == pytest.approx(float(expected_std), rel=1e-6)


def test_subset_size_adapts_to_small_sets():
    assert choose_subset_size(5000, 200) == 200
    assert choose_subset_size(5000, 5000) == 1000
    result = kid(features(50), features(30, seed=2), num_subsets=3)
    assert result.subset_size == 30 and result.n_x == 50 and result.n_y == 30
    with pytest.raises(DyodError, match="at least 2 samples"):
        kid(features(1), features(10))


@pytest.mark.slow
def test_inception_features_from_a_local_state_dict_and_clear_errors(tmp_path):
    from dyod.inception import FIDInceptionV3, InceptionFeatures
    from dyod.evaluation import feature_extractor

    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    state = model.state_dict()
    # the layer names of the FID weights file that torchmetrics / torch-fidelity / pytorch-fid use
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch_pool.bn.running_var", "Mixed_6e.branch7x7dbl_5.conv.weight",
                "Mixed_7c.branch3x3dbl_3b.bn.bias", "fc.weight"):
        assert key in state
    assert state["fc.weight"].shape == (1008, 2048)
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    features = InceptionFeatures(path)
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    out = features(x)
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    with torch.no_grad():
        expected = model(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out.float(), expected)

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(DyodError, match=r"evil.pth holds pickled objects besides tensors, which dyod does not load "
                                        r"\(a pickle can run code\)"):
        InceptionFeatures(tmp_path / "evil.pth")
    # a broken download, a file of another kind, a pickle of tensors that is no state dict: named, not a traceback
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "evil.pth").read_bytes()[:100])
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    torch.save([state["fc.weight"]], tmp_path / "list.pth")
    for name, expected in (("truncated.pth", "cannot be read as a weights file"),
                           ("broken.safetensors", "cannot be read as a weights file (SafetensorError"),
                           ("list.pth", "holds a list, not a state dict of tensors")):
        with pytest.raises(DyodError, match=re.escape(f"{name} {expected}")):
            InceptionFeatures(tmp_path / name)
    with pytest.raises(DyodError, match="Inception weights .* not found. dyod cannot download them"):
        feature_extractor("inception", str(tmp_path / "missing.pth"))
    torch.save({"fc.weight": state["fc.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(DyodError, match="lack"):
        InceptionFeatures(tmp_path / "partial.pth")


def test_eval_command_reports_kid_and_caches_features(tmp_path, capsys, monkeypatch):
    import json

    from dyod.cli import main
    from dyod.world.datasets import make_dataset

    monkeypatch.setenv("DYOD_CACHE", str(tmp_path / "cache"))
    ref = make_dataset("apple-orange", tmp_path / "ref", n=30, seed=0, progress=False)
    same = make_dataset("apple-orange", tmp_path / "same", n=30, seed=1, progress=False)
    other = make_dataset("faces", tmp_path / "faces", n=30, seed=0, progress=False)
    assert main(["eval", str(same), "--ref", str(ref), "--json", str(tmp_path / "same.json")]) == 0
    assert "n = 30 vs 30" in capsys.readouterr().out
    assert main(["eval", str(other), str(ref), "--json", str(tmp_path / "other.json")]) == 0  # REF as a positional
    same_kid = json.loads((tmp_path / "same.json").read_text())["kid_x100"]
    other_kid = json.loads((tmp_path / "other.json").read_text())["kid_x100"]
    assert other_kid > 5 * max(same_kid, 0.05)
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 3
    # A mistyped samples folder is named before the reference's features are computed (none cached for it).
    fresh = make_dataset("faces", tmp_path / "fresh", n=30, seed=1, progress=False)
    assert main(["eval", str(tmp_path / "missing"), "--ref", str(fresh)]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 3
    assert main(["eval", str(same)]) == 2
    assert "give the reference folder: `dyod eval SAMPLES_DIR REF` or `--ref REF`" in capsys.readouterr().err
    assert main(["eval", str(same), str(ref), "--ref", str(other)]) == 2
    assert f"two reference folders given: REF {ref} and --ref {other}; give one" in capsys.readouterr().err


@pytest.mark.slow
def test_cached_features_belong_to_the_weights_that_made_them(tmp_path, monkeypatch):
    """Features cached with one Inception file are not another's (a wrong file first, then the right one), nor the
    emoji network's before `dyod world train-features` replaced it."""
    from dyod.evaluation import folder_features
    from dyod.inception import FIDInceptionV3, InceptionFeatures
    from dyod.world.datasets import make_dataset

    monkeypatch.setenv("DYOD_CACHE", str(tmp_path / "cache"))
    folder = make_dataset("faces", tmp_path / "faces", n=2, seed=0, progress=False)
    extractors = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(FIDInceptionV3().eval().state_dict(), tmp_path / f"inception-{seed}.pth")
        extractors.append(InceptionFeatures(tmp_path / f"inception-{seed}.pth"))
    first, info = folder_features(folder, extractors[0])
    assert not info["cached"]
    second, info = folder_features(folder, extractors[1])
    assert not info["cached"] and not torch.allclose(first, second)
    again, info = folder_features(folder, InceptionFeatures(tmp_path / "inception-0.pth"))  # the same weights
    assert info["cached"] and torch.equal(again, first)


@pytest.mark.slow
def test_feature_extractors_take_images_of_mixed_sizes(tmp_path):
    """A folder of photos rarely has one size: each extractor resizes the images of each size together, keeps their
    order, and gives a folder of one size the numbers of stacking it whole."""
    import numpy as np
    from PIL import Image

    from dyod.data import pil_to_tensor
    from dyod.inception import FIDInceptionV3, InceptionFeatures
    from dyod.world.features import EmojiFeatures

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for side in (48, 80, 48, 64, 80)]
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().eval().state_dict(), tmp_path / "pt_inception.pth")
    for extractor in (EmojiFeatures.bundled(), InceptionFeatures(tmp_path / "pt_inception.pth")):
        mixed = extractor(images, batch_size=4)  # batches that mix sizes, and a size split across two batches
        one_by_one = torch.cat([extractor([im]) for im in images])
        torch.testing.assert_close(mixed, one_by_one, rtol=1e-5, atol=1e-6)
        same_size = [images[0], images[2]]
        assert torch.equal(extractor(same_size), extractor(pil_to_tensor(same_size)))  # as stacking them whole


def test_kid_of_two_sets_used_whole_reports_no_spread_rather_than_a_spread_of_zero():
    """With both sets as small as the subset, every subset is both sets whole and the spread is 0 by construction;
    `dyod eval` printed `± 0.000`, which reads as an exact figure."""
    whole = kid(features(4), features(4, seed=2))
    assert whole.std < 1e-12 and whole.subset_size == 4  # 0 but for the order of the sums
    assert str(whole) == (f"KID×100 = {whole.mean_x100:.3f} (n = 4 vs 4, both sets whole: no spread over subsets to "
                          "report; more images in either set give one)")
    subsampled = kid(features(6), features(4, seed=2), num_subsets=20)  # the larger set subsampled: a real spread
    assert subsampled.std > 0 and re.fullmatch(r"KID×100 = -?\d+\.\d{3} ± \d+\.\d{3} \(n = 6 vs 4, 20 subsets of 4\)",
                                              str(subsampled))


@pytest.fixture
def torch_fidelity_inception(monkeypatch):
    """torch-fidelity's FeatureExtractorInceptionV3 (what torchmetrics' FID and KID use), imported without running its
    package's __init__, which imports torchvision for its other extractors (no torchvision build imports beside the
    CPU torch dyod pins: the reason dyod keeps its own copy of the network, checked here against this one)."""
    import importlib
    import sys
    import types
    from pathlib import Path

    import importlib.machinery

    vendor = Path(sys.prefix) / "vendor" / "torch-fidelity"  # where scripts/setup.sh puts it, apart from site-packages
    spec = importlib.machinery.PathFinder.find_spec("torch_fidelity", [str(vendor)])
    if spec is None:
        pytest.skip(f"torch-fidelity is not installed in {vendor} (scripts/setup.sh installs it for the tests)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    before = set(sys.modules)
    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    yield module
    for name in set(sys.modules) - before:
        sys.modules.pop(name, None)


@pytest.mark.slow
def test_inception_features_are_torch_fidelitys_on_the_same_weights(tmp_path, torch_fidelity_inception):
    """The weights file's key layout is torch-fidelity's (so the one file serves both), and with the same (random)
    weights dyod's 2048-d features are torch-fidelity's: at 299 × 299 both resizes are the identity, and the input is
    scaled as torch-fidelity scales it, (x − 128) / 128."""
    from safetensors.torch import save_file

    from dyod.inception import FIDInceptionV3, InceptionFeatures

    cls = torch_fidelity_inception.FeatureExtractorInceptionV3
    torch.manual_seed(0)
    original = cls.load_state_dict
    cls.load_state_dict = lambda self, state, strict=True: None  # random weights: nothing to download or load
    try:
        torch_fidelity_inception.load_state_dict_from_url = lambda *a, **k: {}
        reference = cls("inception-v3-compat", ["2048"]).eval()
    finally:
        cls.load_state_dict = original
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("running_mean") or name.endswith("bn.bias"):
                tensor.normal_(0, 0.1)
            elif name.endswith("bn.weight"):
                tensor.uniform_(0.8, 1.2)
    state = {k: v.clone().contiguous() for k, v in reference.state_dict().items() if "num_batches_tracked" not in k}
    ours = FIDInceptionV3().state_dict()
    assert set(state) - {"fc.weight", "fc.bias"} == set(k for k in ours if "num_batches_tracked" not in k) - \
        {"fc.weight", "fc.bias"}
    path = tmp_path / "weights-inception.safetensors"
    save_file(state, str(path))
    extractor = InceptionFeatures(path)
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    with torch.no_grad():
        expected = reference(images)[0]
        got = extractor.model((images.float() - 128) / 128)
    assert expected.shape == got.shape == (2, 2048) and expected.abs().max() > 0
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
