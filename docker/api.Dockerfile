# The API image: Flask under gunicorn, also the migration step and Flower (same code, other command).
# The API never runs the model, so torch comes from the CPU-only index: a few hundred MB, not GBs.
#   docker build -f docker/api.Dockerfile -t captioner-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# dependencies first: this layer is reused while only our code changes
COPY pyproject.toml README.md ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && mkdir -p core api worker migrations model \
 && touch core/__init__.py api/__init__.py worker/__init__.py migrations/__init__.py model/__init__.py \
 && pip install . && pip uninstall -y captioner

COPY core core
COPY api api
COPY worker worker
COPY migrations migrations
COPY model model
RUN pip install --no-deps . && useradd --create-home captioner
USER captioner

EXPOSE 8000
CMD ["captioner", "serve", "--host", "0.0.0.0", "--port", "8000"]
