"""Named failure modes.

Every error a user can cause with their input derives from :class:`DialabError`; the CLI turns
them into one line and exit status 2, and the pipeline records them as the reason a unit failed.
"""

from __future__ import annotations


class DialabError(Exception):
    """Base class of all dialab errors that describe bad input or an impossible task."""


class BadInputError(DialabError):
    """An input file or value is unusable; the message names the file and the problem."""

    def __init__(self, problem: str, path: object | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class PsfMeasurementError(DialabError):
    """Too few usable stars to measure a PSF."""


class InsufficientKernelSourcesError(DialabError):
    """Fewer usable sources than the matching-kernel fit needs."""


class NoOverlapError(DialabError):
    """The template does not cover (enough of) the science image."""


class BadSubtractionError(BadInputError):
    """The subtraction failed its own checks: a kernel sum far from the zeropoint ratio, stars whose fluxes
    do not match between the images, or too much residual in the stars' footprints (LSST's BadSubtraction)."""


class RunInterrupted(BaseException):
    """A run stopped by SIGINT or SIGTERM: finished units stay finished, a resume continues exactly. A
    BaseException, like KeyboardInterrupt, so that no "one failed unit must not stop the run" handler swallows it."""

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # as a shell reports a process a signal ended: 130 (SIGINT), 143 (SIGTERM)
