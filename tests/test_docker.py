"""The Docker image installs the torch version that CI tests (no Docker daemon needed)."""

import re

def test_dockerfile_torch_is_the_tested_version(repo_root):
    ci = re.search(r'torch==([\w.+]+)', (repo_root / '.ci' / 'run').read_text())
    docker = re.search(r'^ARG TORCH_VERSION=([\w.+]+)$', (repo_root / 'Dockerfile').read_text(), re.M)
    assert ci and docker, 'torch pin not found in .ci/run or Dockerfile'
    assert docker.group(1) == ci.group(1)
    assert 'torch==${TORCH_VERSION}' in (repo_root / 'Dockerfile').read_text()
