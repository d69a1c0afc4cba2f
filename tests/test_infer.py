"""`infer` on new images: the image reader (every input kind and every refusal), the PNG grid, the
numbers against the functions they come from (the encoder, test-time inference, `gap` on the same
images and seed), and the command end to end for every family on all three input kinds."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pytest
import torch

from amortized_bayes.cli import main
from amortized_bayes.data import ImageInputError
from amortized_bayes.data.images import check_pixels, pairs_grid, read_images
from amortized_bayes.gap import LocalOptimConfig
from tests.helpers import idx_bytes

SHAPE = (28, 28)
# q* for the gap in tens of steps, not thousands: these tests check where numbers come from, not q*.
FAST_OPTIM = LocalOptimConfig(window=10, plateaus=1, max_steps=60)
FAMILIES = ("amortized", "semi-amortized", "factorized", "constant")


def _uint8_images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


# --- the reader ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nhw", "flat", "one", "one_flat", "nchw", "nhwc"])
def test_every_array_layout_reads_as_the_same_images(tmp_path, layout):
    images = _uint8_images(1 if layout.startswith("one") else 4)
    array = {"nhw": images, "flat": images.reshape(-1, 784), "one": images[0], "one_flat": images[0].reshape(784),
             "nchw": images[:, None], "nhwc": images[..., None]}[layout]
    np.save(tmp_path / "x.npy", array)
    batch = read_images(tmp_path / "x.npy", SHAPE)
    # uint8 is divided by 255, exactly as the data layer does for the datasets.
    np.testing.assert_array_equal(batch.pixels, images.reshape(-1, 28, 28).astype(np.float32) / 255.0)
    assert batch.names == tuple(f"x.npy[{i}]" for i in range(len(batch)))


def test_npz_key_idx_and_png_folder_read_the_same_pixels(tmp_path):
    images = _uint8_images(3)
    expected = images.astype(np.float32) / 255.0
    np.savez(tmp_path / "one.npz", anything=images)
    np.savez(tmp_path / "named.npz", labels=np.arange(3), images=images)
    np.savez(tmp_path / "two.npz", a=images, b=np.zeros((1, 784), np.float32))
    (tmp_path / "raw-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "gz-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("ignored")
    for source in ("one.npz", "named.npz", "raw-idx3-ubyte", "gz-idx3-ubyte.gz", "pngs"):
        np.testing.assert_array_equal(read_images(tmp_path / source, SHAPE).pixels, expected, err_msg=source)
    np.testing.assert_array_equal(read_images(tmp_path / "two.npz", SHAPE, key="a").pixels, expected)
    np.testing.assert_array_equal(read_images(folder / "img1.png", SHAPE).pixels, expected[1:2])
    assert read_images(folder, SHAPE).names == ("img0.png", "img1.png", "img2.png")


def test_a_png_of_another_size_or_colour_is_resized_to_grey_with_a_note(tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 40), (255, 255, 255)).save(tmp_path / "white.png")
    notes = []
    batch = read_images(tmp_path / "white.png", SHAPE, note=notes.append)
    assert batch.pixels.shape == (1, 28, 28) and batch.resized == 1
    np.testing.assert_allclose(batch.pixels, 1.0)
    assert len(notes) == 1 and "resized" in notes[0] and "1 of 1" in notes[0]


def test_invert_and_binarize(tmp_path):
    x = np.array([[0.0, 0.2, 0.5, 0.7, 1.0] * 156 + [0.0] * 4], np.float32)
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_allclose(read_images(tmp_path / "x.npy", SHAPE, invert=True).pixels.reshape(1, -1), 1 - x)
    b = read_images(tmp_path / "x.npy", SHAPE, likelihood="bernoulli", binarize=0.5).pixels.reshape(1, -1)
    np.testing.assert_array_equal(b, (x > 0.5).astype(np.float32))


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("shape", "is not 28x28 images"),
    ("range", "outside [0, 1]"),
    ("nan", "NaN or infinite"),
    ("empty", "holds no images"),
    ("object", "not a readable .npy"),
    ("strings", "are not numbers"),
    ("several", "name one with --key"),
    ("no_key", "has no array 'nope'"),
    ("junk", "not an .npy, .npz, PNG or IDX file"),
    ("bad_png", "not a readable PNG"),
    ("empty_folder", "no .png files"),
    ("bernoulli", "neither 0 nor 1"),
    ("threshold", "threshold must be in [0, 1)"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, message):
    path, kwargs = tmp_path / "in.npy", {}
    if case == "shape":
        np.save(path, np.zeros((2, 20, 20), np.float32))
    elif case == "range":
        np.save(path, np.full((1, 28, 28), 1.5, np.float32))
    elif case == "nan":
        a = np.zeros((1, 28, 28), np.float32)
        a[0, 3, 3] = np.nan
        np.save(path, a)
    elif case == "empty":
        np.save(path, np.zeros((0, 28, 28), np.uint8))
    elif case == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "strings":
        np.save(path, np.full((1, 28, 28), "x"))
    elif case in ("several", "no_key"):
        path = tmp_path / "in.npz"
        np.savez(path, a=np.zeros((1, 784)), b=np.zeros((1, 784)))
        kwargs = {"key": "nope"} if case == "no_key" else {}
    elif case == "junk":
        path = tmp_path / "in.bin"
        path.write_bytes(b"not images")
    elif case == "bad_png":
        path = tmp_path / "in.png"
        path.write_bytes(b"\x89PNG but not really")
    elif case == "empty_folder":
        path = tmp_path / "folder"
        path.mkdir()
    elif case == "bernoulli":
        np.save(path, np.full((1, 28, 28), 0.5, np.float32))
        kwargs = {"likelihood": "bernoulli"}
    elif case == "threshold":
        np.save(path, np.zeros((1, 28, 28), np.float32))
        kwargs = {"binarize": 1.0}
    with pytest.raises(ImageInputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        read_images(path if case != "missing" else tmp_path / "absent.npy", SHAPE, **kwargs)


def test_check_pixels_accepts_the_edges_of_each_likelihoods_range():
    check_pixels(np.array([0.0, 1.0, 0.5], np.float32), "gaussian", "x")
    check_pixels(np.array([0.0, 1.0], np.float32), "bernoulli", "x")
    with pytest.raises(ImageInputError):
        check_pixels(np.array([-1e-6], np.float32), "gaussian", "x")


def test_pairs_grid_puts_each_image_above_its_reconstruction():
    top = np.zeros((3, 2, 2), np.float32)
    bottom = np.ones((3, 2, 2), np.float32)
    top[1] = 0.5
    grid = pairs_grid(top, bottom, columns=2, pad=1)
    # 2 columns, 2 row pairs: height 2 * 2 * (2 + 1) + 1, width 2 * (2 + 1) + 1.
    assert grid.shape == (13, 7) and grid.dtype == np.uint8
    assert (grid[1:3, 1:3] == 0).all() and (grid[4:6, 1:3] == 255).all()      # image 0 over its reconstruction
    assert (grid[1:3, 4:6] == 128).all() and (grid[4:6, 4:6] == 255).all()    # image 1 (0.5 -> 128)
    assert (grid[7:9, 1:3] == 0).all() and (grid[10:12, 1:3] == 255).all()    # image 2 starts the next pair
    assert (grid[7:12, 4:6] == 128).all()                                     # no image 3: background
    assert (grid[0, :] == 128).all() and (grid[:, 3] == 128).all()            # padding


# --- the numbers ----------------------------------------------------------------------------------------------

def _fitted(family: str, likelihood: str = "gaussian", seed: int = 0):
    """A model trained for 2 epochs on 40 random images (seconds), as load_fit would return it."""
    from amortized_bayes.checkpoint import load_fit, save_fit
    from amortized_bayes.config import (DataConfig, family_config, LocalInferenceConfig, ModelConfig, RunConfig,
                                        TrainConfig)
    from amortized_bayes.training import TrainingData, fit

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(40, 784, generator=g)
    binary = likelihood == "bernoulli"
    if binary:
        x = (x > 0.5).float()
    config = RunConfig(
        data=DataConfig(n_train=40, n_test=0, binarize="threshold" if binary else "none"),
        model=ModelConfig(latent_dim=3, hidden=8, likelihood=likelihood),
        family=family_config(name=family, width=8, refine_steps=2),
        train=TrainConfig(epochs=2, batch_size=20, eval_every=2, seed=seed,
                          test_inference=LocalInferenceConfig(max_steps=200, window=20)))
    return fit(config, TrainingData(x, None)), save_fit, load_fit


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """One finished run folder per family (model.pt and a done status), and a Bernoulli one."""
    import json

    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for name, likelihood in [(f, "gaussian") for f in FAMILIES] + [("amortized", "bernoulli")]:
        result, save_fit, _ = _fitted(name, likelihood)
        run = root / "runs" / f"{name}-{likelihood}"
        run.mkdir(parents=True)
        save_fit(result, run / "model.pt")
        (run / "status.json").write_text(json.dumps({"state": "done"}))
        dirs[(name, likelihood)] = run
    return dirs


@pytest.mark.parametrize("family", FAMILIES)
def test_infer_gives_the_runs_own_posterior_and_gap_on_the_same_images(run_dirs, family):
    """q(z) is what the family's test-time inference gives; the gap is what `gap` gives for a test split
    of the same images and seed, image by image; the reconstructions are the model's at E[z]."""
    from amortized_bayes.checkpoint import load_fit
    from amortized_bayes.gap import GapConfig, measure_gap
    from amortized_bayes.inference import infer_local
    from amortized_bayes.new_images import elbo_in_chunks, infer_new_images

    x = torch.rand(7, 784, generator=torch.Generator().manual_seed(5))
    config = GapConfig(images=7, splits=("test",), iwae_samples=20, elbo_samples=16, seed=3, optim=FAST_OPTIM,
                       curve_steps=(0, 10))
    fitted = load_fit(run_dirs[(family, "gaussian")] / "model.pt")
    steps = []
    result = infer_new_images(fitted, x, elbo_samples=16, gap=config, seed=3, on_step=lambda s, loss: steps.append(s))

    reference = load_fit(run_dirs[(family, "gaussian")] / "model.pt")
    post = infer_local(reference.model, reference.family, x, reference.config.train.test_inference,
                       torch.Generator().manual_seed(3))
    torch.testing.assert_close(result.mu, post.mu, rtol=0, atol=0)
    torch.testing.assert_close(result.log_sigma, post.log_sigma, rtol=0, atol=0)
    assert result.posterior.steps == post.steps and steps == list(range(1, post.steps + 1))
    assert (post.steps > 0) == (family in ("factorized", "constant"))
    with torch.no_grad():
        torch.testing.assert_close(result.reconstructions, reference.model.reconstruct(post.mu), rtol=0, atol=0)

    gap = measure_gap(load_fit(run_dirs[(family, "gaussian")] / "model.pt"), {"test": x}, config)["splits"]["test"]
    for key in ("amortization_gap", "approximation_gap"):
        np.testing.assert_allclose(getattr(result.gaps, key).numpy(), gap["per_image"][key], rtol=1e-6, atol=1e-6)
    assert result.gap_theta == "posterior mean" and (result.gaps.amortization_gap > -0.5).all()

    # The ELBO in chunks is the ELBO: one chunk against seven, each with many draws, agree within MC error.
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    whole = elbo_in_chunks(fitted, x, post.mu, post.log_sigma, 500, g1, chunk=7)
    single = elbo_in_chunks(fitted, x, post.mu, post.log_sigma, 500, g2, chunk=1)
    assert result.elbo.shape == (7,) and torch.isfinite(result.elbo).all()
    torch.testing.assert_close(whole, single, rtol=0, atol=1.0)
    torch.testing.assert_close(result.elbo, whole, rtol=0, atol=3.0)


def test_same_seed_same_numbers_and_a_new_seed_new_draws(run_dirs):
    from amortized_bayes.checkpoint import load_fit
    from amortized_bayes.new_images import infer_new_images

    x = torch.rand(4, 784, generator=torch.Generator().manual_seed(0))
    run = run_dirs[("factorized", "gaussian")] / "model.pt"
    a = infer_new_images(load_fit(run), x, elbo_samples=8, seed=1)
    b = infer_new_images(load_fit(run), x, elbo_samples=8, seed=1)
    c = infer_new_images(load_fit(run), x, elbo_samples=8, seed=2)
    assert torch.equal(a.mu, b.mu) and torch.equal(a.elbo, b.elbo)
    assert not torch.equal(a.elbo, c.elbo)


# --- the command ----------------------------------------------------------------------------------------------

def _inputs(tmp_path, binary: bool = False) -> dict:
    from PIL import Image

    images = _uint8_images(3, seed=1)
    if binary:
        images = np.where(images > 127, 255, 0).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    folder = tmp_path / "pngs"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    return {"npy": tmp_path / "images.npy", "idx": tmp_path / "images-idx3-ubyte.gz", "png": folder,
            "expected": images.astype(np.float32) / 255.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_infer_command_on_all_three_input_kinds(run_dirs, tmp_path, capsys, family):
    inputs = _inputs(tmp_path)
    outputs = {}
    for kind in ("npy", "idx", "png"):
        out = tmp_path / f"out-{kind}"
        assert main(["infer", str(run_dirs[(family, "gaussian")]), str(inputs[kind]), "--out", str(out),
                     "--elbo-samples", "8", "--seed", "4"]) == 0
        with np.load(out.with_suffix(".npz")) as npz:
            outputs[kind] = {k: npz[k] for k in npz.files}
        assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert printed.count("ELBO per image") == 3 and "wrote" in printed
    npy = outputs["npy"]
    np.testing.assert_array_equal(npy["images"], inputs["expected"])
    assert npy["mu"].shape == (3, 3) and npy["log_sigma"].shape == (3, 3) and npy["elbo"].shape == (3,)
    assert npy["reconstructions"].shape == (3, 28, 28) and str(npy["family"]) == family
    assert (int(npy["inference_steps"]) > 0) == (family in ("factorized", "constant"))
    for kind in ("idx", "png"):  # the same pixels and seed give the same numbers whatever the file kind
        for key in ("images", "mu", "log_sigma", "elbo", "reconstructions"):
            np.testing.assert_array_equal(outputs[kind][key], npy[key], err_msg=f"{kind} {key}")


def test_infer_command_with_gap_and_a_bernoulli_run(run_dirs, tmp_path, capsys):
    inputs = _inputs(tmp_path)
    run = str(run_dirs[("amortized", "bernoulli")])
    # Grey images for a Bernoulli run are refused in one line, and accepted with --binarize.
    assert main(["infer", run, str(inputs["npy"]), "--out", str(tmp_path / "b")]) == 2
    assert "neither 0 nor 1" in capsys.readouterr().err
    assert main(["infer", run, str(inputs["npy"]), "--out", str(tmp_path / "b"), "--binarize", "0.5", "--gap",
                 "--iwae-k", "20", "--elbo-samples", "8", "--grid", "0", "--max-local-steps", "4"]) == 0
    printed = capsys.readouterr()
    assert "amortization gap" in printed.out and "approximation gap" in printed.out
    # Four local steps cannot converge: the file and a note say that the gap is understated.
    assert "q* stopped at --max-local-steps 4 before converging" in printed.err
    with np.load(tmp_path / "b.npz") as npz:
        assert not bool(npz["q_star_converged"])
        assert set(npz["images"].ravel()) <= {0.0, 1.0}
        assert npz["amortization_gap"].shape == (3,) and str(npz["gap_theta"]) == "posterior mean"
        assert ((npz["reconstructions"] >= 0) & (npz["reconstructions"] <= 1)).all()  # probabilities
    assert not (tmp_path / "b.png").exists()  # --grid 0


def test_infer_command_refuses_what_it_cannot_use(run_dirs, tmp_path, capsys):
    import json

    inputs = _inputs(tmp_path)
    unfinished = tmp_path / "runs" / "half"
    unfinished.mkdir(parents=True)
    (unfinished / "status.json").write_text(json.dumps({"state": "running", "epochs_done": 3, "epochs_total": 9}))
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    run = str(run_dirs[("amortized", "gaussian")])
    cases = [
        ([str(unfinished), str(inputs["npy"])], "not finished (state running, epoch 3/9)"),
        ([str(tmp_path), str(inputs["npy"])], "is a results folder"),
        ([str(tmp_path / "nowhere"), str(inputs["npy"])], "no such run folder"),
        ([str(tmp_path / "broken.pt"), str(inputs["npy"])], "not a readable model"),
        ([run, str(tmp_path / "absent.npy")], "no such file"),
        ([run, str(inputs["npy"]), "--elbo-samples", "0"], "must be >= 1"),
    ]
    for args, message in cases:
        assert main(["infer", *args, "--out", str(tmp_path / "o")]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    assert not list(tmp_path.glob("o*"))  # nothing written


def test_infer_from_the_shell(run_dirs, tmp_path):
    """The installed entry point, in a fresh interpreter: exit status, output file, and a one-line error."""
    inputs = _inputs(tmp_path)
    run = str(run_dirs[("factorized", "gaussian")])
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", "infer", run, str(inputs["png"]), "--out",
                           str(tmp_path / "shell"), "--elbo-samples", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test-time inference" in proc.stdout and (tmp_path / "shell.npz").exists()
    np.save(tmp_path / "bad.npy", np.zeros((2, 5), np.float32))
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", "infer", run, str(tmp_path / "bad.npy"), "--out",
                           str(tmp_path / "shell2")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is not 28x28 images" in proc.stderr
