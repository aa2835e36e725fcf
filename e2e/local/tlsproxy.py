#!/usr/bin/env python3
"""tlsproxy.py: TLS in front of the harness's plain-HTTP Headscale (test tooling, stdlib only).

tailscaled dials its control server over TLS on port 443 once a recent connection to the plain
port failed (tailscale.com control/controlhttp: "forcing port 443 dial due to recent noise
dial"), and then keeps doing so while it retries, so against a plain-HTTP Headscale a single
dropped control connection (TUN mode drops one when tailscale0 comes up) would cut the node off
for good. This terminates TLS on LISTEN with CERT/KEY (signed by the harness CA that
e2e/local/images bakes into the test sidecar image) and pipes the bytes to BACKEND.

usage: tlsproxy.py LISTEN_HOST:PORT BACKEND_HOST:PORT CERT KEY
"""
import asyncio
import ssl
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - closing a broken stream
            pass


def main():
    listen, backend, cert, key = sys.argv[1:5]
    lhost, lport = listen.rsplit(":", 1)
    bhost, bport = backend.rsplit(":", 1)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection(bhost, int(bport))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    async def serve():
        server = await asyncio.start_server(handle, lhost, int(lport), ssl=ctx)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
