import pytest
import torch

import pmod
from pmod.tiny import randomize_routers, tiny_qwen2_vl, tiny_qwen2_vl_processor
from tests.helpers.qwen_words import WORDS

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module", params=["2", "2.5"])
def setup(request):
    """The tiny Qwen2-VL / Qwen2.5-VL model and processor of tests/pipelines/test_qwen2_vl_pipeline.py and
    tests/data/test_video_files.py (a test module's own `setup` fixture overrides it)."""
    model = pmod.apply_pmod(tiny_qwen2_vl(version=request.param, patch_size=7),
                            pmod.PModConfig(schedule=[1.0, 1.0, 0.5, 0.5]))
    randomize_routers(model)
    return model, tiny_qwen2_vl_processor(model, WORDS, image_size=28)
