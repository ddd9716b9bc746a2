"""A ThingsBoard device, as the official Python HTTP SDK (tb-mqtt-client's
TBHTTPDevice) runs it, against sluice's HTTP listener.

argv: base_url token cloud_port cloud_ca cloud_user cloud_password prefix fw_sha256
The cloud side (publishing P/commands and P/attributes/shared) is done with
mosquitto_pub against the cloud broker. Prints one JSON document of what
happened; exits non-zero on a step that did not complete in time.
"""
import hashlib
import json
import subprocess
import sys
import time

from tb_device_http import TBHTTPDevice

(base, token, cloud_port, cloud_ca, cloud_user, cloud_pw, prefix,
 fw_sha256) = sys.argv[1:9]
out = {"steps": []}


def step(name):
    out["steps"].append(name)


def wait(what, cond, limit=30.0):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            out["failed"] = what
            print(json.dumps(out))
            sys.exit(1)
        time.sleep(0.05)


def cloud_publish(topic, payload):
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", cloud_port, "--cafile", cloud_ca,
         "-u", cloud_user, "-P", cloud_pw, "-q", "1", "-t", topic, "-m", json.dumps(payload)],
        check=True)


device = TBHTTPDevice(base, token, chunk_size=4096)
if not device.connect():
    out["failed"] = "connect"
    print(json.dumps(out))
    sys.exit(1)
step("connected")

device.send_attributes({"model": "bench-http"})
out["attribute_response"] = device.request_attributes(
    client_keys=["model"], shared_keys=["fw_title"])
step("attributes")

pushes = []
commands = []


def on_command(data):
    commands.append(data)
    device.send_rpc(name="reply", params={"ok": True}, rpc_id=data["id"])


device.subscribe("attributes", pushes.append)
device.subscribe("rpc", on_command)
# Pacing only: let both subscription threads send their first poll.
time.sleep(1.0)
cloud_publish(f"{prefix}/attributes/shared",
              {"device": "dev-http", "values": {"targetTemp": 21}})
wait("the shared attribute push", lambda: pushes)
out["push"] = pushes[0]
cloud_publish(f"{prefix}/commands",
              {"id": "cmd-http", "device": "dev-http", "method": "blink", "params": {"n": 3}})
wait("the command", lambda: commands)
out["command"] = commands[0]
step("polls")

# The SDK starts with null current_fw_* values, which telemetry refuses
# (as ThingsBoard does); a device that runs a firmware has them set.
device.current_firmware_info = {"current_fw_title": "Initial", "current_fw_version": "v0"}
device.get_firmware_update()
with open("bench_http.bin", "rb") as f:
    data = f.read()
out["firmware"] = {"size": len(data),
                   "sha256_ok": hashlib.sha256(data).hexdigest() == fw_sha256}
step("firmware")
# The SDK queues its fw_state telemetry for a background thread: let it
# send everything before exiting.
device._TBHTTPDevice__worker["publish"]["queue"].join()
print(json.dumps(out))
