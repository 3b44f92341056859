"""Issue 10's memory figure: the proxy's peak RSS (VmHWM) while 16 requests, each a 4 MiB
body of about 1.4 million empty strings, arrive in parallel (each must get 413
batch_too_large). Starts its own redis-server and the proxy on free 127.0.0.1 ports and
stops both by pid.

usage: python3 bench/figures/huge_bodies.py target/release/discount-proxy
"""
import http.client, os, socket, subprocess, sys, threading, time

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            yield line.split()[0], int(line.split()[1])

binary = sys.argv[1]
redis_port, proxy_port = free_port(), free_port()
redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no",
                          "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
env = dict(os.environ, DISCOUNT_PROXY_SERVER__LISTEN=f"127.0.0.1:{proxy_port}",
           DISCOUNT_PROXY_REDIS__URL=f"redis://127.0.0.1:{redis_port}/0", RUST_LOG="warn")
proxy = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", proxy_port), timeout=1).close(); break
        except OSError:
            if time.time() > deadline: raise
            time.sleep(0.05)
    limit = 4 * 1024 * 1024
    count = (limit - 11) // 3
    body = b'{"sns":[' + b'"",' * (count - 1) + b'""]}'
    assert len(body) <= limit, len(body)
    before = dict(hwm(proxy.pid))
    statuses = []
    def send():
        c = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=120)
        c.request("POST", "/v1/discounts/lookup", body, {"Content-Type": "application/json"})
        r = c.getresponse(); r.read(); statuses.append(r.status); c.close()
    start = time.time()
    threads = [threading.Thread(target=send) for _ in range(16)]
    for t in threads: t.start()
    for t in threads: t.join()
    took = time.time() - start
    after = dict(hwm(proxy.pid))
    print(f"{binary}: body {len(body)} bytes, {count} empty strings x16; statuses {sorted(set(statuses))}; "
          f"VmHWM before {before['VmHWM:']//1024} MiB, after {after['VmHWM:']//1024} MiB; "
          f"VmRSS after {after['VmRSS:']//1024} MiB; wall {took:.2f}s")
finally:
    proxy.terminate(); proxy.wait(); redis.terminate(); redis.wait()
