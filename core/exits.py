"""The exit statuses of the `sdjobs` command, shared by the core and the front ends."""

#: Every job done.
EXIT_OK = 0
#: A job failed, or the WebUI could not be reached.
EXIT_FAILED = 1
#: Bad usage or bad input: nothing ran.
EXIT_USAGE = 2
#: Cancelled with Ctrl-C, or the Tk window closed mid-job.
EXIT_CANCELLED = 130
#: Stopped by SIGTERM: the running job went back to the queue, to resume where it was.
EXIT_TERMINATED = 143
#: The output's reader went away (`sdjobs ... | head`): 128 + SIGPIPE, as a shell tool ends.
EXIT_BROKEN_PIPE = 141
