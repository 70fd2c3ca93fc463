import os
import shutil

import pytest

# No network here: an open_clip pretrained-weights lookup would otherwise hang ~45 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def module_dir(request, tmp_path_factory):
    """`module_dir(name)` makes a directory for one test module's fixtures; all are removed when the module
    ends with no failure.

    Module fixtures train runs and write checkpoints (~150 MB each); left until the session ends they add
    up to gigabytes, which a CI machine with little free disk cannot spare (pyproject's
    tmp_path_retention_policy does the same for each test's own tmp_path).
    """
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    failed_before = request.session.testsfailed

    def make(name: str):
        sub = path / name
        sub.mkdir()
        return sub

    yield make
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)
