"""A free TCP port for a test's process group (torchrun's --master_port, accelerate's --main_process_port), so
launches never share one, in one pytest process or in several (pytest -n)."""
import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
