"""The one way vipd opens a Kubernetes API client (kubernetes-asyncio, asyncio side).

Owns: turning (kubeconfig path | in-cluster, optional API server URL) into a ready
``kubernetes_asyncio.client.ApiClient``, and the control-plane node listing that
``vipd kubeadm join`` uses to find its peers.

The API server override: a control-plane node should talk to its *local* apiserver
(e.g. https://127.0.0.1:6444), not through the VIP it is electing a holder for. The
override replaces only the URL; credentials and CA stay the kubeconfig's. Because the
apiserver's serving certificate need not name the override address (kubeadm's names the
node, ``kubernetes``, ``kubernetes.default...``, the service IP, the advertise address and
the control-plane endpoint, not 127.0.0.1), TLS verification keeps checking the name the
kubeconfig trusted: unless the kubeconfig sets ``tls-server-name`` itself, the host of the
kubeconfig's own ``server`` URL becomes the TLS server name (SNI + hostname check).

Everything here is asyncio code. Under trio, call it through trio-asyncio
(``aio_as_trio(fn)(args)``, inside ``trio_asyncio.open_loop()``).

Must never: use kubernetes-asyncio's global default Configuration (several clients with
different servers live in one process), write back to the kubeconfig file, or log
credentials.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.config.kube_config import KubeConfigLoader

from vipd.errors import VipdError

T = TypeVar("T")

DEFAULT_KUBECONFIG = "/etc/kubernetes/admin.conf"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
LEGACY_CONTROL_PLANE_LABEL = "node-role.kubernetes.io/master"  # kubeadm < 1.20


class KubeConfigError(VipdError):
    """The kubeconfig (or the in-cluster service account) could not be loaded."""


class KubeApiError(VipdError):
    """A Kubernetes API call failed (unreachable, refused, timed out, or an HTTP error)."""


async def load_configuration(kubeconfig: str, api_server: str | None = None) -> k8s.Configuration:
    """A private Configuration from ``kubeconfig`` ("" = in-cluster), with the URL override."""
    configuration = k8s.Configuration()
    try:
        if kubeconfig:
            # A small local file, read once, synchronously (the library's loader would too).
            if not os.path.isfile(kubeconfig):  # noqa: ASYNC240
                raise FileNotFoundError(f"no such file: {kubeconfig}")
            with open(kubeconfig, "rb") as fh:  # noqa: ASYNC230
                doc = yaml.safe_load(fh)
            if not isinstance(doc, dict) or not doc.get("clusters"):
                # e.g. systemd's placeholder credential while admin.conf does not exist yet
                raise ValueError("not a kubeconfig (empty, or no clusters:)")
            # The document as read, with relative file paths resolved against the
            # kubeconfig's directory (as kubectl does); no persister: never written back.
            loader = KubeConfigLoader(config_dict=doc,
                                      config_base_path=os.path.dirname(os.path.abspath(kubeconfig)))  # noqa: ASYNC240
            await loader.load_and_set(configuration)
        else:
            k8s_config.load_incluster_config(client_configuration=configuration)
    except (ConfigException, OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        where = kubeconfig or "in-cluster service account"
        raise KubeConfigError(f"cannot load Kubernetes credentials from {where}: {exc}") from exc
    if api_server:
        original = urlsplit(configuration.host).hostname
        if not configuration.tls_server_name and original and _is_name_worth_keeping(original, api_server):
            configuration.tls_server_name = original
        configuration.host = api_server.rstrip("/")
    return configuration


def _is_name_worth_keeping(original: str, api_server: str) -> bool:
    """Keep verifying the kubeconfig's host name unless the override names the same host.

    An IP address works as TLS server name too: Python checks it against the IP SANs and
    sends no SNI for it.
    """
    return (urlsplit(api_server).hostname or "") != original


@contextlib.asynccontextmanager
async def open_api_client(
    kubeconfig: str = DEFAULT_KUBECONFIG, api_server: str | None = None
) -> AsyncIterator[k8s.ApiClient]:
    """Yield an ApiClient; closes its connection pool on exit. asyncio only."""
    configuration = await load_configuration(kubeconfig, api_server)
    async with k8s.ApiClient(configuration=configuration) as api:
        yield api


async def open_api(
    kubeconfig: str, api_server: str | None, api_class: Callable[[Any], T]
) -> tuple[contextlib.AsyncExitStack, T]:
    """asyncio side: an API object (e.g. ``CoordinationV1Api``) and the stack that closes its client.

    For long-lived users (the Lease backend, discovery) that keep the client between calls.
    """
    stack = contextlib.AsyncExitStack()
    try:
        api_client = await stack.enter_async_context(open_api_client(kubeconfig, api_server))
    except BaseException:
        await stack.aclose()
        raise
    return stack, api_class(api_client)


async def close_api_from_trio(stack: contextlib.AsyncExitStack | None, log: Any, event: str) -> None:
    """trio side: close what ``open_api`` opened, shielded and bounded (it runs in cleanups).

    A loop that is already gone leaves nothing to close: logged at debug as ``event``.
    """
    if stack is None:
        return
    import trio
    import trio_asyncio

    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await trio_asyncio.aio_as_trio(stack.aclose)()
        except (RuntimeError, OSError) as exc:
            log.debug(event, error=str(exc))


def _internal_ip(node: k8s.V1Node) -> str | None:
    addresses = (node.status.addresses if node.status else None) or []
    for addr in addresses:
        if addr.type == "InternalIP" and addr.address:
            return str(addr.address)
    return None


async def list_control_plane_nodes(
    kubeconfig: str = DEFAULT_KUBECONFIG, api_server: str | None = None, *, within: float = 10.0
) -> list[tuple[str, str]]:
    """(name, InternalIP) of the control-plane nodes, sorted by name. asyncio only.

    Nodes labelled ``node-role.kubernetes.io/control-plane`` (or, when none is, the legacy
    ``.../master`` label); a node without an InternalIP is left out. The whole call ends
    within ``within`` seconds. Raises KubeConfigError or KubeApiError.
    """
    import asyncio

    import aiohttp

    found: list[tuple[str, str]] = []
    try:
        async with asyncio.timeout(within), open_api_client(kubeconfig, api_server) as api:
            core = k8s.CoreV1Api(api)
            for label in (CONTROL_PLANE_LABEL, LEGACY_CONTROL_PLANE_LABEL):
                nodes = await core.list_node(label_selector=label)
                for node in nodes.items or []:
                    ip = _internal_ip(node)
                    if ip and node.metadata and node.metadata.name:
                        found.append((node.metadata.name, ip))
                if found:
                    break
    except k8s.ApiException as exc:
        raise KubeApiError(f"listing control-plane nodes: HTTP {exc.status} {exc.reason}") from exc
    except TimeoutError as exc:
        raise KubeApiError(f"listing control-plane nodes: no answer within {within:g}s") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise KubeApiError(f"listing control-plane nodes: {type(exc).__name__}: {exc}") from exc
    return sorted(found)
