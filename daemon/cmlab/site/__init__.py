"""What every component of a site server shares (Postfix's `global/`).

Paths, `site.toml`, the SMS log writer, state codes, the inbox engine and its contract,
`formats/` (every drop-file, message and manifest format, writer beside parser), `sitedb/`
(all SQL), trust, CABs, the content library, the prerequisite rules and the emulated
installation. Imports only `cmlab.core`.
"""
