"""Root images: what a guest boots as ``/``. ``recipe`` describes a Debian image as data,
``sources`` finds the mirror, ``debian`` builds one, ``catalog`` names them."""
