"""Kept for one release (docs/scale.md): gateways configured with
`--KernelGatewayApp.kernel_websocket_connection_class=autocoder.gateway_ws.NoDelayChannels`
keep working; the class is now `autocoder.kernel.gateway_ws.NoDelayChannels`."""

from autocoder.kernel.gateway_ws import NoDelayChannels

__all__ = ["NoDelayChannels"]
