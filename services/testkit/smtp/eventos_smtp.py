"""An aiosmtpd handler for the eventos test suites.

Run as::

    /usr/bin/python3 -m aiosmtpd -n -l 127.0.0.1:PORT \
        -c eventos_smtp.MaildirHandler MAILDIR MODE_FILE PARENT_PID

with this directory on PYTHONPATH. Every message the server takes is saved
as one file in ``MAILDIR/new`` (written to ``MAILDIR/tmp`` first, then
renamed, so a reader never sees half a message), with its envelope beside
it. ``MODE_FILE`` holds ``accept``, ``tempfail`` or ``permfail``; it is read
for every message, so a test switches the answer while the server runs.
Refused messages are saved too, in ``MAILDIR/rejected``, so a test can count
the attempts a client made.

The server exits by itself when ``PARENT_PID`` is no longer its parent: a
test process that is killed outright leaves no server behind.
"""

import itertools
import json
import os
import threading
import time

ANSWERS = {
    "accept": "250 2.0.0 Message accepted for delivery",
    "tempfail": "451 4.3.0 Mailbox temporarily unavailable (test mode)",
    "permfail": "550 5.7.1 Message refused (test mode)",
    # A 4xx that refuses the mail's form, as servers lacking RFC 6531 answer.
    "smtputf8": "451 4.6.7 SMTPUTF8 is required (test mode)",
}


class MaildirHandler:
    """Saves or refuses every message, as the mode file says."""

    def __init__(self, maildir, mode_file):
        self.maildir = maildir
        self.mode_file = mode_file
        self.counter = itertools.count()
        for sub in ("tmp", "new", "rejected"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 3:
            parser.error(
                "usage: -c eventos_smtp.MaildirHandler MAILDIR MODE_FILE PARENT_PID"
            )
        maildir, mode_file, parent = args
        _exit_with_parent(int(parent))
        return cls(maildir, mode_file)

    def mode(self):
        try:
            with open(self.mode_file, encoding="utf-8") as f:
                mode = f.read().strip()
        except FileNotFoundError:
            mode = "accept"
        # An unknown mode is a bug in the test: refuse loudly rather than
        # accept silently.
        return mode if mode in ANSWERS else "permfail"

    async def handle_DATA(self, server, session, envelope):
        mode = self.mode()
        # Names sort in arrival order: nanoseconds, then a sequence number
        # for messages within the same nanosecond.
        name = "%020d.%06d.%d" % (time.time_ns(), next(self.counter), os.getpid())
        folder = "new" if mode == "accept" else "rejected"
        self.save(folder, name, envelope)
        return ANSWERS[mode]

    def save(self, folder, name, envelope):
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
        }
        content = envelope.original_content or b""
        tmp = os.path.join(self.maildir, "tmp")
        dest = os.path.join(self.maildir, folder)
        # The envelope first: once the message file is visible, its
        # envelope is too.
        for suffix, data in ((".json", json.dumps(meta).encode()), (".eml", content)):
            path = os.path.join(tmp, name + suffix)
            with open(path, "wb") as f:
                f.write(data)
            os.rename(path, os.path.join(dest, name + suffix))


def _exit_with_parent(parent):
    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
