"""Scripted headless SPICE client on spice-gtk (GObject introspection).

Run with the system python, which has `gi` (python3-gi,
gir1.2-spiceclientglib-2.0); the project venv has not:

    /usr/bin/python3 -m tests.harness.gi_client --port 5930 --summary out.json

(from the repo root). tests/harness/client.py builds this command line for
tests; the options are listed by --help.

Theory of operation: one GLib main loop. The session opens every channel the
server lists (audio, usbredir and smartcard must be enabled *before*
connect()). Each requested exchange registers a goal; once every goal is met
and --min-duration has passed, or when --duration runs out, the client takes
its screenshot, disconnects and writes a JSON summary. Exit status: 0 all
goals met, 1 some goal missed, 2 could not connect.

GI pitfalls handled here: Session.connect()/Channel.connect() shadow
GObject.connect (signals are hooked through GObject.Object.connect); port
writes and record data go through ctypes (gi_ctypes.py); monitor configs are
sent only after the agent announced its capabilities; in client mouse mode
(agent present) relative motion is ignored, so we send positions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import struct
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness.gi_ctypes import NativeCalls
from tests.harness.images import bgrx_to_rgb, write_png

gi = importlib.import_module("gi")
gi.require_version("SpiceClientGLib", "2.0")
GLib: Any = importlib.import_module("gi.repository.GLib")
GObject: Any = importlib.import_module("gi.repository.GObject")
Gio: Any = importlib.import_module("gi.repository.Gio")
Spice: Any = importlib.import_module("gi.repository.SpiceClientGLib")

SELECTION_CLIPBOARD = 0
VD_AGENT_CLIPBOARD_UTF8_TEXT = 1
VD_AGENT_CAP_MONITORS_CONFIG = 1
MOUSE_MODE_CLIENT = 2
LEFT_BUTTON = 1  # SPICE_MOUSE_BUTTON_LEFT
LEFT_BUTTON_MASK = 1
RECORD_TONE_HZ = 880
RECORD_PACKET_MS = 20


def hook(obj: Any, signal: str, callback: Any, *extra: Any) -> None:
    GObject.Object.connect(obj, signal, callback, *extra)


def channel_kind(channel: Any) -> str:
    # WebdavChannel subclasses PortChannel: the wire type tells them apart
    return str(Spice.Channel.type_to_string(channel.props.channel_type))


def as_bytes(data: Any, size: int) -> bytes:
    """Signal payloads arrive as an address (int) or a byte sequence."""
    if isinstance(data, int):
        return NativeCalls.read_memory(data, size)
    return bytes(data)[:size]


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.native = NativeCalls()
        self.t0 = time.monotonic()
        self.loop: Any = GLib.MainLoop()
        self.goals: dict[str, bool] = {}
        self.summary: dict[str, Any] = {
            "connected": False,
            "channels": {},
            "errors": [],
            "events": [],
            "display": {"invalidates": 0},
            "inputs": {},
            "agent": {},
            "playback": {"starts": 0, "packets": 0, "bytes": 0},
            "record": {"starts": 0, "sent_bytes": 0},
            "ports": {},
            "usb": {},
            "smartcard": {},
        }
        self.main: Any = None
        self.inputs: Any = None
        self.record: Any = None
        self.primary: tuple[int, int, int, int] | None = None  # width, height, stride, address
        self.record_timer: int | None = None
        self.record_phase = 0.0
        self.record_format = (2, 48000)
        self.agent_started = False
        self.agent_polls = 0
        self.session: Any = self._make_session()
        self._declare_goals()

    # ------------------------------------------------------------------ setup
    def _make_session(self) -> Any:
        a = self.args
        s = Spice.Session()
        s.props.host = a.host
        if a.port:
            s.props.port = str(a.port)
        if a.tls_port:
            s.props.tls_port = str(a.tls_port)
        if a.password is not None:
            s.props.password = a.password
        if a.username is not None:
            s.props.username = a.username  # SASL (spice-gtk picks it when the server offers)
        if a.ca_file:
            s.props.ca_file = a.ca_file
        if a.host_subject:
            s.props.cert_subject = a.host_subject
        if a.proxy:
            s.props.proxy = a.proxy
        s.props.enable_audio = True
        s.props.enable_usbredir = True
        if a.smartcard_db:
            s.props.enable_smartcard = True
            s.props.smartcard_db = a.smartcard_db
            s.props.smartcard_certificates = a.smartcard_certs.split(",")
        # must exist before usbredir channels come up, or each logs CRITICALs
        self.usb: Any = Spice.UsbDeviceManager.get(s)
        hook(self.usb, "device-added", self.on_usb_device_added)
        hook(self.usb, "device-error", self.on_usb_device_error)
        hook(s, "channel-new", self.on_channel_new)
        hook(s, "notify::migration-state", self.on_migration_state)
        return s

    def on_migration_state(self, session: Any, _pspec: Any) -> None:
        """A live migration's progress (connecting, migrating, none), as events."""
        state = str(session.props.migration_state.value_nick)
        self.summary.setdefault("migration", []).append([self.now(), state])
        self.event(f"migration {state}")

    def _declare_goals(self) -> None:
        a = self.args
        wanted = {
            "channels": a.expect_channels > 0,
            "display": a.expect_display,
            "inputs": bool(a.keys) or a.mouse,
            "clipboard_to_guest": a.clipboard is not None,
            "clipboard_from_guest": a.want_guest_clipboard,
            "file_copy": a.send_file is not None,
            "monitors_config": a.monitors is not None,
            "port_echo": a.port_data is not None,
            "playback": a.expect_playback,
            "record": a.record_seconds > 0,
            "usb_shared_cd": a.share_cd is not None,
        }
        self.goals = {name: False for name, on in wanted.items() if on}

    # ---------------------------------------------------------------- helpers
    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def event(self, what: str) -> None:
        self.summary["events"].append([self.now(), what])
        if self.args.verbose:
            print(f"[{self.now():7.3f}] {what}", file=sys.stderr)

    def error(self, where: str, message: str) -> None:
        self.summary["errors"].append([self.now(), where, message])
        self.event(f"ERROR {where}: {message}")

    def done(self, goal: str) -> None:
        if goal in self.goals and not self.goals[goal]:
            self.goals[goal] = True
            self.event(f"goal met: {goal}")

    # --------------------------------------------------------------- channels
    def on_channel_new(self, _session: Any, channel: Any) -> None:
        key = f"{channel_kind(channel)}:{channel.props.channel_id}"
        self.summary["channels"][key] = {"opened_at": None}
        hook(channel, "channel-event", self.on_channel_event, key)
        if isinstance(channel, Spice.MainChannel):
            self.main = channel
            hook(channel, "main-agent-update", self.on_agent_update)
            hook(channel, "main-clipboard-selection-grab", self.on_guest_grab)
            hook(channel, "main-clipboard-selection", self.on_guest_clipboard)
            hook(channel, "main-clipboard-selection-request", self.on_guest_request)
        elif isinstance(channel, Spice.DisplayChannel):
            hook(channel, "display-primary-create", self.on_primary_create)
            hook(channel, "display-invalidate", self.on_invalidate)
        elif isinstance(channel, Spice.InputsChannel):
            self.inputs = channel
        elif isinstance(channel, Spice.PlaybackChannel):
            hook(channel, "playback-start", self.on_playback_start)
            hook(channel, "playback-data", self.on_playback_data)
        elif isinstance(channel, Spice.RecordChannel):
            self.record = channel
            hook(channel, "record-start", self.on_record_start)
            hook(channel, "record-stop", self.on_record_stop)
        elif isinstance(channel, Spice.PortChannel):
            hook(channel, "notify::port-opened", self.on_port_opened)
            hook(channel, "port-data", self.on_port_data)
        channel.connect()

    def on_channel_event(self, channel: Any, event: Any, key: str) -> None:
        nick = str(event.value_nick)
        self.event(f"{key} {nick}")
        info = self.summary["channels"][key]
        if nick == "opened" and info["opened_at"] is None:
            info["opened_at"] = self.now()
            self._on_opened(channel)
        elif nick.startswith("error"):
            err = channel.get_error()
            self.error(key, f"{nick}: {err.message if err else ''}")
            if isinstance(channel, Spice.MainChannel):
                self.loop.quit()  # nothing else can work without main

    def _on_opened(self, channel: Any) -> None:
        opened = sum(1 for c in self.summary["channels"].values() if c["opened_at"] is not None)
        if opened >= self.args.expect_channels > 0:
            self.done("channels")
        if isinstance(channel, Spice.MainChannel):
            self.summary["connected"] = True
            if self.args.share_cd:
                GLib.timeout_add(200, self.share_cd)
        elif isinstance(channel, Spice.InputsChannel):
            GLib.timeout_add(300, self.send_inputs)

    # ---------------------------------------------------------------- display
    def on_primary_create(
        self, _ch: Any, _fmt: int, width: int, height: int, stride: int, _shmid: int, address: int
    ) -> None:
        self.primary = (width, height, stride, address)
        self.summary["display"]["size"] = [width, height]
        self.event(f"display primary {width}x{height}")

    def on_invalidate(self, _ch: Any, _x: int, _y: int, _w: int, _h: int) -> None:
        self.summary["display"]["invalidates"] += 1
        self.done("display")

    def screenshot(self, path: Path) -> None:
        if self.primary is None:
            self.error("screenshot", "no primary surface")
            return
        width, height, stride, address = self.primary
        raw = self.native.read_memory(address, stride * height)
        write_png(path, width, height, bgrx_to_rgb(raw, width, height, stride))
        self.summary["screenshot"] = str(path)

    # ----------------------------------------------------------------- inputs
    def send_inputs(self) -> bool:
        sent: dict[str, Any] = {}
        keys = self.args.keys
        if keys.startswith("@"):  # a long list, in a file
            keys = Path(keys[1:]).read_text()
        codes = [int(c, 0) for c in keys.split(",") if c]
        for code in codes:
            self.inputs.key_press(code)
            self.inputs.key_release(code)
        sent["keys"] = len(codes)
        if self.args.mouse:
            # with an agent the server is in client mouse mode: absolute positions only
            if self.main is not None and self.main.props.mouse_mode == MOUSE_MODE_CLIENT:
                self.inputs.position(120, 80, 0, 0)
                sent["mouse"] = "position"
            else:
                self.inputs.motion(8, 4, 0)
                sent["mouse"] = "motion"
            self.inputs.button_press(LEFT_BUTTON, LEFT_BUTTON_MASK)
            self.inputs.button_release(LEFT_BUTTON, 0)
        self.summary["inputs"] = sent
        self.done("inputs")
        return False

    # ------------------------------------------------------------------ agent
    def on_agent_update(self, channel: Any) -> None:
        connected = bool(channel.props.agent_connected)
        self.summary["agent"]["connected"] = connected
        self.event(f"agent connected={connected}")
        if connected and not self.agent_started:
            self.agent_started = True
            GLib.timeout_add(100, self.agent_exchange)

    def agent_exchange(self) -> bool:
        # the agent's own capabilities may arrive after agent-connected, and
        # spice-gtk drops monitor configs until it has seen them
        self.agent_polls += 1
        if not self.main.agent_test_capability(VD_AGENT_CAP_MONITORS_CONFIG):
            if self.agent_polls < 100:
                return True
            self.error("agent", "no agent capabilities after 10 s")
        a = self.args
        if a.clipboard is not None:
            self.main.clipboard_selection_grab(SELECTION_CLIPBOARD, [VD_AGENT_CLIPBOARD_UTF8_TEXT])
            self.event("agent: clipboard grab sent")
        if a.monitors:
            width, height = (int(v) for v in a.monitors.split("x"))
            self.main.update_display_enabled(0, True, False)
            self.main.update_display(0, 0, 0, width, height, False)
            ok = bool(self.main.send_monitor_config())
            self.summary["agent"]["monitors_config_sent"] = ok
            if ok:
                self.done("monitors_config")
        if a.send_file:
            source = Gio.File.new_for_path(a.send_file)
            self.main.file_copy_async(
                [source], Gio.FileCopyFlags.NONE, None, None, None, self.on_file_copied, None
            )
            self.event("agent: file copy started")
        return False

    def on_file_copied(self, channel: Any, result: Any, _data: Any) -> None:
        try:
            ok = bool(channel.file_copy_finish(result))
            self.summary["agent"]["file_copy"] = "ok" if ok else "failed"
            if ok:
                self.done("file_copy")
        except GLib.Error as e:
            self.summary["agent"]["file_copy"] = f"error: {e.message}"
            self.error("agent", f"file copy: {e.message}")

    def on_guest_request(self, channel: Any, selection: int, ctype: int) -> bool:
        text = (self.args.clipboard or "").encode()
        channel.clipboard_selection_notify(selection, ctype, list(text))
        self.summary["agent"]["clipboard_to_guest_bytes"] = len(text)
        self.event(f"agent: guest requested our clipboard, sent {len(text)} bytes")
        self.done("clipboard_to_guest")
        return True

    def on_guest_grab(self, channel: Any, selection: int, _types: Any, _ntypes: int) -> bool:
        self.event("agent: guest grabbed the clipboard")
        channel.clipboard_selection_request(selection, VD_AGENT_CLIPBOARD_UTF8_TEXT)
        return True

    def on_guest_clipboard(
        self, _ch: Any, _selection: int, _ctype: int, data: Any, size: int
    ) -> None:
        text = as_bytes(data, size).decode(errors="replace")
        self.summary["agent"]["clipboard_from_guest"] = text
        self.event(f"agent: guest clipboard {text!r}")
        self.done("clipboard_from_guest")

    # ------------------------------------------------------------------ audio
    def on_playback_start(self, _ch: Any, fmt: int, channels: int, rate: int) -> None:
        self.summary["playback"]["starts"] += 1
        self.summary["playback"]["format"] = [fmt, channels, rate]

    def on_playback_data(self, _ch: Any, _data: Any, size: int) -> None:
        p = self.summary["playback"]
        p["packets"] += 1
        p["bytes"] += size
        if p["packets"] >= 50:  # half a second of audio
            self.done("playback")

    def on_record_start(self, _ch: Any, fmt: int, channels: int, rate: int) -> None:
        self.summary["record"]["starts"] += 1
        self.summary["record"]["format"] = [fmt, channels, rate]
        self.event(f"record start {channels}ch {rate} Hz")
        if self.args.record_seconds > 0 and self.record_timer is None:
            self.record_format = (channels, rate)
            self.record_timer = GLib.timeout_add(RECORD_PACKET_MS, self.send_record_packet)

    def on_record_stop(self, _ch: Any) -> None:
        self.event("record stop")
        if self.record_timer is not None:
            GLib.source_remove(self.record_timer)
            self.record_timer = None

    def send_record_packet(self) -> bool:
        """20 ms of an 880 Hz tone (S16LE); the guest logs its peak level."""
        channels, rate = self.record_format
        frames = rate * RECORD_PACKET_MS // 1000
        step = 2 * math.pi * RECORD_TONE_HZ / rate
        samples = []
        for _ in range(frames):
            samples.extend([int(12000 * math.sin(self.record_phase))] * channels)
            self.record_phase = (self.record_phase + step) % (2 * math.pi)
        pcm = struct.pack(f"<{len(samples)}h", *samples)
        self.native.record_send(self.record, pcm, int(time.monotonic() * 1000))
        r = self.summary["record"]
        r["sent_bytes"] += len(pcm)
        if r["sent_bytes"] >= self.args.record_seconds * rate * channels * 2:
            self.done("record")
        return True

    # ------------------------------------------------------------------ ports
    def on_port_opened(self, channel: Any, _pspec: Any) -> None:
        name = str(channel.props.port_name)
        state = self.summary["ports"].setdefault(name, {"sent": 0, "received": 0})
        state["opened"] = bool(channel.props.port_opened)
        self.event(f"port {name} opened={state['opened']}")
        if state["opened"] and name == self.args.port_name and self.args.port_data is not None:
            data = self.args.port_data.encode()
            self.native.port_write(channel, data)
            state["sent"] += len(data)

    def on_port_data(self, channel: Any, data: Any, size: int) -> None:
        name = str(channel.props.port_name)
        state = self.summary["ports"].setdefault(name, {"sent": 0, "received": 0})
        state["received"] += size
        state.setdefault("first_data", as_bytes(data, size)[:80].decode(errors="replace"))
        if name == self.args.port_name and 0 < state["sent"] <= state["received"]:
            self.done("port_echo")

    # -------------------------------------------------------------------- usb
    def share_cd(self) -> bool:
        try:
            created = bool(self.usb.create_shared_cd_device(self.args.share_cd))
            self.event(f"usb: shared CD created={created}")
        except GLib.Error as e:
            self.error("usb", f"create_shared_cd_device: {e.message}")
        return False

    def on_usb_device_added(self, manager: Any, device: Any) -> None:
        if self.args.share_cd and manager.is_device_shared_cd(device):
            manager.connect_device_async(device, None, self.on_usb_connected, None)

    def on_usb_device_error(self, _manager: Any, _device: Any, err: Any) -> None:
        self.error("usb", str(err.message))

    def on_usb_connected(self, manager: Any, result: Any, _data: Any) -> None:
        try:
            ok = bool(manager.connect_device_finish(result))
        except GLib.Error as e:
            self.error("usb", f"connect shared CD: {e.message}")
            ok = False
        self.summary["usb"]["shared_cd_connected"] = ok
        self.event(f"usb: shared CD connected={ok}")
        if ok:
            self.done("usb_shared_cd")

    # -------------------------------------------------------------------- run
    def tick(self) -> bool:
        elapsed = time.monotonic() - self.t0
        finished = all(self.goals.values()) and elapsed >= self.args.min_duration
        if finished or elapsed >= self.args.duration:
            self.loop.quit()
            return False
        return True

    def run(self) -> int:
        if not self.session.connect():
            self.error("session", "spice_session_connect failed")
            return self.finish(2)
        GLib.timeout_add(100, self.tick)
        self.loop.run()
        if self.args.screenshot:
            self.screenshot(Path(self.args.screenshot))
        for channel in self.session.get_channels():
            key = f"{channel_kind(channel)}:{channel.props.channel_id}"
            self.summary["channels"].setdefault(key, {"opened_at": None})
            self.summary["channels"][key]["read_bytes"] = int(channel.props.total_read_bytes)
        self.session.disconnect()
        if not self.summary["connected"]:
            return self.finish(2)
        return self.finish(0 if all(self.goals.values()) else 1)

    def finish(self, status: int) -> int:
        s = self.summary
        s["goals"] = self.goals
        s["missed"] = sorted(name for name, ok in self.goals.items() if not ok)
        s["opened"] = sorted(k for k, v in s["channels"].items() if v.get("opened_at") is not None)
        s["elapsed"] = self.now()
        s["status"] = status
        text = json.dumps(s, indent=1, sort_keys=True)
        if self.args.summary:
            Path(self.args.summary).write_text(text + "\n")
        print(text)
        return status


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="scripted spice-gtk client (see module doc)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tls-port", type=int, default=0)
    p.add_argument("--password")
    p.add_argument("--username", help="SASL user name (a server with sasl=on)")
    p.add_argument("--ca-file")
    p.add_argument("--proxy", help="http://HOST:PORT, an HTTP CONNECT proxy (spice-gtk's)")
    p.add_argument("--host-subject")
    p.add_argument("--duration", type=float, default=10.0, help="hard limit, seconds")
    p.add_argument("--min-duration", type=float, default=0.0, help="stay at least this long")
    p.add_argument("--summary", help="also write the JSON summary to this file")
    p.add_argument("--screenshot", help="PNG of the primary surface at the end")
    p.add_argument("--expect-channels", type=int, default=0, help="goal: this many opened")
    p.add_argument("--expect-display", action="store_true", help="goal: a display update")
    p.add_argument("--expect-playback", action="store_true", help="goal: playback data")
    p.add_argument(
        "--keys", default="", help="comma list of scancodes to press+release (@FILE: from FILE)"
    )
    p.add_argument("--mouse", action="store_true", help="move the mouse and click")
    p.add_argument("--clipboard", help="text the guest gets through the agent")
    p.add_argument(
        "--want-guest-clipboard", action="store_true", help="goal: receive the guest's clipboard"
    )
    p.add_argument("--send-file", help="copy this file to the guest through the agent")
    p.add_argument("--monitors", help="send a monitors config WIDTHxHEIGHT")
    p.add_argument("--port-name", default="org.example.test")
    p.add_argument("--port-data", help="write this to --port-name; goal: it comes back")
    p.add_argument(
        "--record-seconds",
        type=float,
        default=0.0,
        help="goal: send this much tone on the record channel",
    )
    p.add_argument("--share-cd", help="redirect this file as a USB CD-ROM")
    p.add_argument("--smartcard-db", help="NSS db (sql:DIR) for a software smartcard")
    p.add_argument("--smartcard-certs", default="card1,card2,card3")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not (args.port or args.tls_port):
        p.error("need --port or --tls-port")
    return args


def main(argv: list[str] | None = None) -> int:
    return Client(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
