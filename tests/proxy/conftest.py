"""Fixtures shared by the proxy's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.tls import client_context, issue_server_cert, load_or_create_ca, server_context


@pytest.fixture(scope="module")
def tls_pair_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    folder = tmp_path_factory.mktemp("pki")
    ca = load_or_create_ca(folder)
    cert, key = issue_server_cert(ca, "O=spicetap,CN=test", ["127.0.0.1"], folder)
    client = client_context(Path(folder / "ca-cert.pem"), False, None)
    return server_context(cert, key, None), client
