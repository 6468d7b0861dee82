"""The local HTTP service the GIMP plug-in talks to: the command (``server``), its aiohttp API
(``app``), the discovery and token files (``files``) and the device/weights probe (``probe``)."""
