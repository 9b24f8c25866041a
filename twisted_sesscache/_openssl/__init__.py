"""The one place that reaches OpenSSL below pyOpenSSL."""
