"""A ThingsBoard device, as the official Python SDK (tb-mqtt-client,
TBDeviceMqttClient) runs it, against sluice's MQTT listener.

argv: host port token cloud_port cloud_ca cloud_user cloud_password prefix fw_sha256
The cloud side (publishing P/commands and P/attributes/shared) is done with
mosquitto_pub against the cloud broker. Prints one JSON document of what
happened; exits non-zero on a step that did not complete in time.
"""
import hashlib
import json
import subprocess
import sys
import time

from tb_device_mqtt import TBDeviceMqttClient

(host, port, token, cloud_port, cloud_ca, cloud_user, cloud_pw, prefix,
 fw_sha256) = sys.argv[1:10]
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


rpc_calls = []
client = TBDeviceMqttClient(host, int(port), username=token, chunk_size=1024)


def on_rpc(request_id, body):
    rpc_calls.append([request_id, body])
    client.send_rpc_reply(request_id, {"ok": True, "pin": body["params"]["pin"]})


client.set_server_side_rpc_request_handler(on_rpc)
client.connect()
# The SDK sends nothing until sluice answered its getSessionLimits RPC.
wait("connect + getSessionLimits", lambda: client.is_connected() and client.rate_limits_received)
step("connected")

rc = client.send_telemetry({"temperature": 21.5, "humidity": 40}).get()
out["telemetry_rc"] = rc
rc = client.send_attributes({"model": "bench", "fwSupported": True}).get()
out["attributes_rc"] = rc
step("published")

answers = []
client.request_attributes(["model"], ["targetTemp"], lambda content, exc: answers.append(content))
wait("attribute response", lambda: answers)
out["attribute_response_before"] = answers[0]

pushes = []
client.subscribe_to_all_attributes(lambda content, exc: pushes.append(content))
cloud_publish(prefix + "/attributes/shared", {"device": "dev-1", "values": {"targetTemp": 23}})
wait("shared attribute push", lambda: pushes)
out["push"] = pushes[0]

answers.clear()
client.request_attributes(["model"], ["targetTemp"], lambda content, exc: answers.append(content))
wait("second attribute response", lambda: answers)
out["attribute_response_after"] = answers[0]
step("attributes")

cloud_publish(prefix + "/commands",
              {"id": "cmd-1", "device": "dev-1", "method": "setGpio", "params": {"pin": 7}})
wait("server-side RPC", lambda: rpc_calls)
out["rpc"] = rpc_calls[0]
step("rpc")

client.get_firmware_update()
wait("firmware UPDATED", lambda: client.current_firmware_info.get("fw_state") == "UPDATED", 90)
title = client.firmware_info.get("fw_title")
with open(title, "rb") as f:
    data = f.read()
out["firmware"] = {"title": title, "size": len(data),
                   "sha256_ok": hashlib.sha256(data).hexdigest() == fw_sha256,
                   "info": client.current_firmware_info}
step("firmware")
time.sleep(0.5)
client.disconnect()
print(json.dumps(out))
