"""The ``qkrestore`` command line: one module per command family, registered here.

* :mod:`.surgery` — ``merge`` and ``pro`` (the restore jobs);
* :mod:`.checks` — ``inspect-layers``, ``verify`` and ``push``;
* :mod:`.diagnostics` — ``drift``, ``attn-distance``, ``autocorr`` and ``niah``;
* :mod:`.sweep` — ``sweep`` and ``select-layers`` (choosing what to restore);
* :mod:`.demo` — ``demo``.

Shared options live in :mod:`.options`, consoles/JSON/progress/tables in :mod:`.output`, and the
application with its error map in :mod:`.app`. Commands are plain module-level functions; the
console script is ``qkrestore.cli:main``.
"""

from __future__ import annotations

from . import checks, demo, diagnostics, locality, surgery, sweep
from .app import app, main

app.command(epilog=surgery.MERGE_EPILOG)(surgery.merge)
app.command(epilog=surgery.PRO_EPILOG)(surgery.pro)
app.command("inspect-layers", epilog=checks.INSPECT_EPILOG)(checks.inspect_layers)
app.command(epilog=checks.VERIFY_EPILOG)(checks.verify)
app.command(epilog=checks.PUSH_EPILOG)(checks.push)
app.command(epilog=demo.DEMO_EPILOG)(demo.demo)
app.command(epilog=diagnostics.DRIFT_EPILOG)(diagnostics.drift)
app.command("attn-distance", epilog=diagnostics.ATTN_DISTANCE_EPILOG)(diagnostics.attn_distance)
app.command(epilog=diagnostics.AUTOCORR_EPILOG)(diagnostics.autocorr)
app.command(epilog=diagnostics.NIAH_EPILOG)(diagnostics.niah)
app.command("attn-locality", epilog=locality.ATTN_LOCALITY_EPILOG)(locality.attn_locality)
app.command(epilog=sweep.SWEEP_EPILOG)(sweep.sweep)
app.command("select-layers", epilog=sweep.SELECT_LAYERS_EPILOG)(sweep.select_layers)

__all__ = ["app", "main"]
