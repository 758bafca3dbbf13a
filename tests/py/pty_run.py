"""Runs a command on a pseudo-terminal of a given width, as a user's terminal would, and copies
everything it draws to stdout (progress bars draw only on a terminal).

Usage: python pty_run.py COLUMNS COMMAND [ARGS...]; exits with the command's status.
"""
import fcntl, os, pty, struct, sys, termios

cols = int(sys.argv[1])
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, cols, 0, 0))
out = sys.stdout.buffer
while True:
    try:
        chunk = os.read(fd, 65536)
    except OSError:  # EIO: the child closed the terminal
        break
    if not chunk:
        break
    out.write(chunk)
    out.flush()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
