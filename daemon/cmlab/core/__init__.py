"""cmlab's bottom layer: what knows nothing of ConfigMgr (Postfix's `util/`).

Durable file writes, no-follow opening and copy-while-hashing (`fs`), batch flushing
(`flush`), hashing, safe XML, strict JSON, the exception tree (`errors`),
failpoints for crash tests and sd_notify. Imports nothing from cmlab above it.
"""
