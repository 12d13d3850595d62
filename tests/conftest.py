import os

# Three test processes share two cores (pytest.ini's -n 3), with the ranks they start: one thread each, or
# OpenMP's spinning threads steal the cores the others compute on.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from clorae_ds.models import ModelConfig

CORPUS = [
    "Kyrie Irving plays for the Nets in New York",
    "Obama met Merkel in Berlin on Tuesday",
    "RT @user : Taylor Swift announces new tour dates",
    "( ( person : Kyrie Irving ) )",
    "( ( Obama ( meet : Merkel ) ) )",
    "Police arrested two men after the attack in Paris",
] * 10


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """One locally trained tokenizer shared by the tiny presets of the whole run."""
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    ModelConfig(family="t5", preset="tiny").build(CORPUS, directory)
    return directory


@pytest.fixture(scope="session")
def llava_tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("llava_tokenizer"))
    ModelConfig(family="llava", preset="tiny").build(CORPUS, directory)
    return directory


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """The slow tests first: spread over the xdist workers from the start, the long multi-rank runs and benchmark
    smokes no longer end the suite one after another while the other workers sit idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
