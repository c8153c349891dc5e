"""benchmarks/tensorboard_screenshot.py against a real run: a short sphere fit, a tensorboard server, headless Chromium.

Needs Chromium (``apt-get install -y chromium``) and the ``playwright`` package (the ``dev`` extra); without them
the test fails with the script's message saying what to install.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger

from benchmarks.tensorboard_screenshot import ScreenshotError, find_chromium, main, take_screenshot
from lightning_amor.apps.sphere_figures import SphereContours
from tests.test_module import make_data, make_model, make_trainer


def viridis_pixels(picture: np.ndarray) -> int:
    """How many pixels are within a few levels of a dark-to-mid viridis colour (the contour maps' colours, which
    TensorBoard's own white, grey and orange interface never uses)."""
    palette = (colormaps["viridis"](np.linspace(0.0, 0.6, 32))[:, :3] * 255).astype(np.int16)
    pixels = picture.reshape(-1, 1, 3).astype(np.int16)
    return int((np.abs(pixels - palette[None]).max(-1) <= 6).any(-1).sum())


def test_screenshot_of_the_images_tab_shows_the_sphere_figure(tmp_path):
    find_chromium()  # fails first, with what to install, on a machine without Chromium
    logger = TensorBoardLogger(tmp_path / "logs", name="sphere")
    trainer = make_trainer(tmp_path, max_steps=2, val_check_interval=2, logger=logger,
                           callbacks=[SphereContours(num_contexts=4, lat_steps=30, lon_steps=60)])
    trainer.fit(make_model(), make_data(tmp_path))

    out = tmp_path / "shot.png"
    main(["--logdir", str(tmp_path / "logs"), "--out", str(out), "--width", "1400", "--height", "900",
          "--timeout", "90"])
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (900, 1400, 3)
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 500, "the screenshot is (nearly) blank"
    # the figure: a 2 x 2 grid of contour maps of about 840 x 580 pixels at actual size, in viridis colours
    assert viridis_pixels(picture) > 50_000, "the sphere figure is not on the screenshot"
    # the TensorBoard page around it: its orange header bar
    header = picture[5:40, 600:1300].reshape(-1, 3).astype(int)
    assert (np.abs(header - [245, 124, 0]).max(-1) <= 12).mean() > 0.8, "no TensorBoard header on the screenshot"


def test_screenshot_errors_name_the_problem(tmp_path):
    with pytest.raises(ScreenshotError, match="no Chromium found .*apt-get install -y chromium"):
        find_chromium(str(tmp_path / "no-such-browser"))
    with pytest.raises(ScreenshotError, match="does not exist"):
        take_screenshot(tmp_path / "missing", tmp_path / "shot.png")
