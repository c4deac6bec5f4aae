import os
import sys

import pytest
import torch

# test helpers and the test modules other tests import from, in every folder of the mirrored layout
for _folder in ("", *('data', 'pipelines', 'integrations')):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), _folder))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
