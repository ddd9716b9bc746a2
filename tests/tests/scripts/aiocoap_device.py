"""A CoAP device built on aiocoap (the Python library), against sluice's
CoAP listener.

argv: host port token fw_title fw_version next_fw_version

(a) POSTs telemetry as a CON with content-format 50;
(b) GETs the staged firmware fw_title/fw_version (aiocoap fetches the
    Block2 blocks itself) and reports its size and sha256;
(c) observes attributes/updates with the library API (the CLI prints only
    the first notification) and prints the line "observing" once the
    registration is answered; the test then stages next_fw_version, and the
    script waits for the notification that carries it.

Prints one JSON document of what happened as its last line; exits non-zero
when a step fails or does not complete in time.
"""
import asyncio
import hashlib
import json
import sys

from aiocoap import GET, POST, Context, Message, Reliable

host, port, token, fw_title, fw_version, next_version = sys.argv[1:7]
base = f"coap://{host}:{port}/api/v1/{token}"
out = {"steps": []}
LIMIT_S = 30


def dotted(code):
    return code.dotted


async def run():
    ctx = await Context.create_client_context()
    try:
        # Reliable: a CON, retransmitted by aiocoap until acknowledged.
        telemetry = Message(code=POST, transport_tuning=Reliable, uri=f"{base}/telemetry",
                            payload=json.dumps({"temperature": 21.5, "via": "aiocoap"}).encode())
        telemetry.opt.content_format = 50
        r = await asyncio.wait_for(ctx.request(telemetry).response, LIMIT_S)
        out["telemetry"] = dotted(r.code)
        out["steps"].append("telemetry")

        fw = Message(code=GET, uri=f"{base}/firmware?title={fw_title}&version={fw_version}")
        r = await asyncio.wait_for(ctx.request(fw).response, LIMIT_S)
        out["firmware"] = {
            "code": dotted(r.code),
            "size": len(r.payload),
            "sha256": hashlib.sha256(r.payload).hexdigest(),
            "last_block2": None if r.opt.block2 is None else
            [r.opt.block2.block_number, r.opt.block2.more, r.opt.block2.size_exponent],
        }
        out["steps"].append("firmware")

        observe = Message(code=GET, uri=f"{base}/attributes/updates", observe=0)
        req = ctx.request(observe)
        first = await asyncio.wait_for(req.response, LIMIT_S)
        out["registration"] = {"code": dotted(first.code), "observe": first.opt.observe,
                               "body": json.loads(first.payload)}
        out["steps"].append("registered")
        print("observing", flush=True)

        async def notifications():
            seen = []
            async for m in req.observation:
                body = json.loads(m.payload)
                seen.append({"observe": m.opt.observe, "body": body})
                if body.get("fw_version") == next_version:
                    return seen
            return seen

        out["notifications"] = await asyncio.wait_for(notifications(), LIMIT_S)
        req.observation.cancel()
        out["steps"].append("notified")
    finally:
        await ctx.shutdown()


try:
    asyncio.run(run())
except Exception as e:  # report what failed, in the JSON the test reads
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out), flush=True)
sys.exit(0 if "error" not in out else 1)
