"""The HTML report of a run, a backtest or a deployment's ledger.

:mod:`.results` is what it shows, as data (saved as JSON beside the report), and the
figures of its summary; :mod:`.gather` reads them from trading's ledger and an embedded
system; :mod:`.svg` draws the plots and :mod:`.html` writes the page. It knows no
service: the CLI hands it the ledger and the system.
"""
