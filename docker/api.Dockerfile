# The API image: Flask under gunicorn, also the migration step and Flower (same code, other command).
# It installs captioner[api]: the API never runs the model, so the image carries no torch.
#   docker build -f docker/api.Dockerfile -t captioner-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# dependencies first: this layer is reused while only our code changes
COPY pyproject.toml README.md ./
RUN for d in model core api worker migrations cli bench; do mkdir -p $d && touch $d/__init__.py; done \
 && pip install '.[api]' && pip uninstall -y captioner

COPY model model
COPY core core
COPY api api
COPY worker worker
COPY migrations migrations
COPY cli cli
COPY bench bench
RUN pip install --no-deps . && useradd --create-home captioner
USER captioner

EXPOSE 8000
CMD ["captioner", "serve", "--host", "0.0.0.0", "--port", "8000"]
