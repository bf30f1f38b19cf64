"""What a run tells about itself: stage traces (trace.py), the `_sage` envelope, the views that
read them (views.py: `sage trace`, the HTML report, OTLP), the live dashboard, progress lines,
secret redaction."""
