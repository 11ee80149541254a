"""The kernel websocket a gateway serving autocoder's kernels should use (runs in the gateway).

`--KernelGatewayApp.kernel_websocket_connection_class=autocoder.kernel.gateway_ws.NoDelayChannels`
(`autocoder.gateway_ws.NoDelayChannels`, its old name, works for one more release)

Neither jupyter_server nor the gateway turns Nagle's algorithm off on the kernel websocket, so
each small reply waits for the client's delayed ACK: `print(1+1)` measured 48 ms through the
gateway against 3.5 ms direct, and 5.3 ms with TCP_NODELAY (bench/gateway.py). autocoder's kernels cap their output
themselves (output_cap), so the server's iopub rate limit is off: it would drop output silently
in the middle of a run instead of cutting it where the run's record says.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from traitlets import Bool


class NoDelayChannels(ZMQChannelsWebsocketConnection):  # type: ignore[misc]
    limit_rate = Bool(False, config=True, help="Rate-limit iopub (autocoder's kernels cap output).")

    def connect(self) -> Any:
        self.websocket_handler.set_nodelay(True)
        return super().connect()
