# The node lab's stand-in for a sidecar mesh's proxy (Istio's, Linkerd's):
# the pod's outbound TCP is redirected here (iptables REDIRECT to 15001);
# each connection is forwarded to where it was going, which the kernel
# keeps for a redirected connection (SO_ORIGINAL_DST). The proxy runs as
# uid 1337, whose own connections are not redirected.
import os, socket, struct, threading

SO_ORIGINAL_DST = 80
PORT = int(os.environ.get("PROXY_PORT", "15001"))


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle(client):
    try:
        raw = client.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack("!2xH4s8x", raw)
        upstream = socket.create_connection((socket.inet_ntoa(addr), port), timeout=5)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
    pump(client, upstream)


listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", PORT))
listener.listen(128)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
