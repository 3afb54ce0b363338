package org.pacsflow.xdspeer;

import jakarta.activation.DataSource;

import java.io.ByteArrayInputStream;
import java.io.InputStream;
import java.io.OutputStream;

/** Bytes held in memory as an attachment; readable any number of times (MTOM may read twice). */
record BytesDataSource(byte[] bytes, String contentType) implements DataSource {

    @Override
    public InputStream getInputStream() {
        return new ByteArrayInputStream(bytes);
    }

    @Override
    public OutputStream getOutputStream() {
        throw new UnsupportedOperationException("read-only");
    }

    @Override
    public String getContentType() {
        return contentType == null ? "application/octet-stream" : contentType;
    }

    @Override
    public String getName() {
        return "document";
    }
}
