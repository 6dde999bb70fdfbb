"""ctypes work-arounds for spice-gtk calls that GObject introspection gets wrong.

Imported only by gi_client.py (system python). Why each exists:
* spice_port_channel_write_async() keeps a pointer to the caller's buffer
  until the message is sent, but GI frees its temporary copy as soon as the
  call returns, so the guest would receive garbage. We call the C function
  with a ctypes buffer that we keep alive.
* RecordChannel.send_data() and display-primary-create hand out raw
  addresses (ints): we pass/read memory through ctypes.
"""

from __future__ import annotations

import ctypes
from typing import Any

_LIB = "libspice-client-glib-2.0.so.8"


class NativeCalls:
    def __init__(self) -> None:
        self._lib = ctypes.CDLL(_LIB)
        write = self._lib.spice_port_channel_write_async
        write.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        write.restype = None
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype = ctypes.c_void_p
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        self._get_pointer = get_pointer
        self._alive: list[ctypes.Array[ctypes.c_char]] = []  # buffers spice-gtk may still read

    def gobject_address(self, obj: Any) -> int:
        return int(self._get_pointer(obj.__gpointer__, None))

    def port_write(self, channel: Any, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        self._alive.append(buf)
        self._lib.spice_port_channel_write_async(
            self.gobject_address(channel), ctypes.addressof(buf), len(data), None, None, None
        )

    @staticmethod
    def record_send(channel: Any, pcm: bytes, timestamp_ms: int) -> None:
        buf = ctypes.create_string_buffer(pcm, len(pcm))  # copied by spice-gtk during the call
        channel.send_data(ctypes.addressof(buf), len(pcm), timestamp_ms & 0xFFFFFFFF)

    @staticmethod
    def read_memory(address: int, size: int) -> bytes:
        return ctypes.string_at(address, size)
